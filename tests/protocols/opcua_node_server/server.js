// An OPC UA server SensorFleet did not write (node-opcua from npm), for the third-party collector
// tests: a boiler with a Double temperature (string node id), an Int32 pressure (numeric node
// id, found by browse path), a String label (not a number), and a pump's Boolean in a namespace
// of its own (addressed by namespace URI).
//
// usage: node server.js PORT STEPS [secure PKI_DIR]
// With `secure`: only Basic256Sha256 (Sign or SignAndEncrypt) and only user "operator" with
// password "s3cret"; it trusts an unknown client certificate on first use (its PKI in PKI_DIR).
// Prints "READY" once listening; on a line "go" on stdin it changes every variable STEPS times,
// 300 ms apart, with source timestamps 2026-12-02T10:00:00Z + k s, then prints "DONE". Step 4
// of the temperature is Bad (a sensor failure), step 5 Uncertain; the rest Good.
"use strict";
const { OPCUAServer } = require("node-opcua-server");
const { SecurityPolicy } = require("node-opcua-secure-channel");
const { MessageSecurityMode } = require("node-opcua-service-secure-channel");
const { DataType } = require("node-opcua-variant");
const { StatusCodes } = require("node-opcua-status-code");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const readline = require("readline");

const port = parseInt(process.argv[2], 10);
const steps = parseInt(process.argv[3] || "8", 10);
const secure = process.argv[4] === "secure";
const BASE = Date.UTC(2026, 11, 2, 10, 0, 0);

(async () => {
  const security = secure ? {
    securityPolicies: [SecurityPolicy.Basic256Sha256],
    securityModes: [MessageSecurityMode.Sign, MessageSecurityMode.SignAndEncrypt],
    allowAnonymous: false,
    userManager: { isValidUser: (user, password) => user === "operator" && password === "s3cret" },
    serverCertificateManager: new OPCUACertificateManager({ rootFolder: process.argv[5], automaticallyAcceptUnknownCertificate: true }),
  } : { securityPolicies: [SecurityPolicy.None], securityModes: [MessageSecurityMode.None], allowAnonymous: true };
  const server = new OPCUAServer({
    port,
    resourcePath: "/",
    ...security,
    buildInfo: { productName: "foreign-plant", manufacturerName: "not SensorFleet" },
  });
  await server.initialize();
  const addressSpace = server.engine.addressSpace;
  const own = addressSpace.getOwnNamespace(); // index 1
  const plant = addressSpace.registerNamespace("urn:foreign:plant"); // index 2
  const boiler = own.addObject({ organizedBy: addressSpace.rootFolder.objects, browseName: "Boiler" });
  const temperature = own.addVariable({ componentOf: boiler, browseName: "Temperature", nodeId: "s=Boiler.Temperature", dataType: "Double",
                                        value: { dataType: DataType.Double, value: 20.0 } });
  const pressure = own.addVariable({ componentOf: boiler, browseName: "Pressure", nodeId: "i=1001", dataType: "Int32",
                                     value: { dataType: DataType.Int32, value: 1000 } });
  const label = own.addVariable({ componentOf: boiler, browseName: "Label", nodeId: "s=Boiler.Label", dataType: "String",
                                  value: { dataType: DataType.String, value: "idle" } });
  const pump = plant.addObject({ organizedBy: addressSpace.rootFolder.objects, browseName: "Pump" });
  const running = plant.addVariable({ componentOf: pump, browseName: "Running", nodeId: "s=Pump.Running", dataType: "Boolean",
                                      value: { dataType: DataType.Boolean, value: false } });
  const at = (k) => new Date(BASE + k * 1000);
  temperature.setValueFromSource({ dataType: DataType.Double, value: 20.0 }, StatusCodes.Good, at(0));
  pressure.setValueFromSource({ dataType: DataType.Int32, value: 1000 }, StatusCodes.Good, at(0));
  label.setValueFromSource({ dataType: DataType.String, value: "idle" }, StatusCodes.Good, at(0));
  running.setValueFromSource({ dataType: DataType.Boolean, value: false }, StatusCodes.Good, at(0));
  await server.start();
  console.log("READY");

  const input = readline.createInterface({ input: process.stdin });
  input.on("line", async (line) => {
    if (line.trim() !== "go") return;
    for (let k = 1; k <= steps; k++) {
      await new Promise((resolve) => setTimeout(resolve, 300));
      const status = k === 4 ? StatusCodes.BadSensorFailure : k === 5 ? StatusCodes.UncertainLastUsableValue : StatusCodes.Good;
      temperature.setValueFromSource({ dataType: DataType.Double, value: 20.0 + 0.5 * k }, status, at(k));
      pressure.setValueFromSource({ dataType: DataType.Int32, value: 1000 + k }, StatusCodes.Good, at(k));
      label.setValueFromSource({ dataType: DataType.String, value: `step ${k}` }, StatusCodes.Good, at(k));
      running.setValueFromSource({ dataType: DataType.Boolean, value: k % 2 === 1 }, StatusCodes.Good, at(k));
    }
    console.log("DONE");
  });
  const stop = async () => { await server.shutdown(0); process.exit(0); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
})().catch((err) => { console.error(err); process.exit(1); });
