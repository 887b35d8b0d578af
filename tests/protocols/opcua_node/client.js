// An independent OPC UA client (node-opcua from npm) for the two-way interop tests.
// usage: node client.js <endpoint url> <namespace uri> '<JSON list of steps>'
// Steps: {"op": "read", "node": "opcua-00001/TemperatureSetpoint"}
//        {"op": "write", "node": "...", "value": 30.5}
//        {"op": "call", "object": "opcua-00002", "method": "opcua-00002/InjectFault", "args": [["String", "dropout"], ["Double", 1.5]]}
//        {"op": "sleep", "seconds": 1.0}
//        {"op": "history", "node": "...", "start": "<ISO>", "end": "<ISO>", "numValuesPerNode": 100}  (follows continuation points)
// Node ids are string ids in the namespace of <namespace uri>. Prints one JSON document: a list
// with one result per step, on the line that starts with "RESULT " (node-opcua may print notices).
"use strict";
const { OPCUAClient, AttributeIds, DataType, TimestampsToReturn, HistoryReadRequest, ReadRawModifiedDetails } = require("node-opcua-client");

function describe(dataValue) {
  return {
    value: dataValue.value ? dataValue.value.value : null,
    status: dataValue.statusCode.name,
    sourceTimestamp: dataValue.sourceTimestamp ? dataValue.sourceTimestamp.toISOString() : null,
    sourcePicoseconds: dataValue.sourcePicoseconds || 0,
  };
}

async function historyRaw(session, nodeId, step) {
  const values = [];
  const pages = [];
  let continuationPoint = null;
  for (let page = 0; page < 1000; page++) {
    const request = new HistoryReadRequest({
      historyReadDetails: new ReadRawModifiedDetails({
        isReadModified: false, startTime: new Date(step.start), endTime: new Date(step.end),
        numValuesPerNode: step.numValuesPerNode || 0, returnBounds: false,
      }),
      timestampsToReturn: TimestampsToReturn.Source,
      releaseContinuationPoints: false,
      nodesToRead: [{ nodeId, continuationPoint }],
    });
    const response = await session.performMessageTransaction(request);
    const result = response.results[0];
    const got = result.historyData && result.historyData.dataValues ? result.historyData.dataValues : [];
    pages.push({ status: result.statusCode.name, values: got.length });
    for (const dv of got) values.push(describe(dv));
    continuationPoint = result.continuationPoint && result.continuationPoint.length ? result.continuationPoint : null;
    if (!continuationPoint) break;
  }
  return { pages, values };
}

async function main() {
  const [url, namespaceUri, plan] = process.argv.slice(2);
  const steps = JSON.parse(plan);
  const client = OPCUAClient.create({ endpointMustExist: false, connectionStrategy: { maxRetry: 3, initialDelay: 200, maxDelay: 1000 } });
  await client.connect(url);
  const session = await client.createSession();
  const namespaces = await session.readNamespaceArray();
  const ns = namespaces.indexOf(namespaceUri);
  if (ns < 0) throw new Error(`namespace ${namespaceUri} not on the server: ${namespaces}`);
  const id = (s) => `ns=${ns};s=${s}`;
  const out = [];
  try {
    for (const step of steps) {
      if (step.op === "read") {
        out.push(describe(await session.read({ nodeId: id(step.node), attributeId: AttributeIds.Value })));
      } else if (step.op === "write") {
        const status = await session.write({ nodeId: id(step.node), attributeId: AttributeIds.Value, value: { value: { dataType: DataType.Double, value: step.value } } });
        out.push({ status: status.name, at: new Date().toISOString() });
      } else if (step.op === "call") {
        const result = await session.call({
          objectId: id(step.object), methodId: id(step.method),
          inputArguments: (step.args || []).map(([type, value]) => ({ dataType: DataType[type], value })),
        });
        out.push({ status: result.statusCode.name, inputArgumentResults: (result.inputArgumentResults || []).map((s) => s.name), at: new Date().toISOString() });
      } else if (step.op === "sleep") {
        await new Promise((resolve) => setTimeout(resolve, step.seconds * 1000));
        out.push({});
      } else if (step.op === "history") {
        out.push(await historyRaw(session, id(step.node), step));
      } else {
        throw new Error(`unknown step ${JSON.stringify(step)}`);
      }
    }
  } finally {
    await session.close();
    await client.disconnect();
  }
  process.stdout.write("RESULT " + JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
