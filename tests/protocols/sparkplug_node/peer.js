// An independent Sparkplug B peer for the interop tests: Eclipse Tahu's payload codec
// (sparkplug-payload) and the mqtt client, both from the npm registry.
//
//   node peer.js decode                 stdin: one base64 payload a line; stdout: one JSON a line
//   node peer.js listen URL FILTER SECS  subscribe, print {topic, tahu, raw} a line for SECS seconds (or until SIGTERM)
//   node peer.js publish URL GROUP NODE DEVICE COUNT [INTERVAL_MS]
//                                        an edge node: NBIRTH, DBIRTH, COUNT DDATA, then NDEATH
"use strict";
const sparkplug = require("sparkplug-payload").get("spBv1.0");
const proto = require("sparkplug-payload/lib/sparkplugPayloadProto");
const Long = require("long");

const Payload = proto.org.eclipse.tahu.protobuf.Payload;
const json = (value) => JSON.stringify(value, (_key, v) => (Long.isLong(v) ? v.toNumber() : v instanceof Uint8Array ? Buffer.from(v).toString("base64") : v));
// `tahu`: Tahu's own decoding (it needs each metric's datatype, which data messages leave out);
// `raw`: every field as protobuf decoded it, for aliases and values of data messages.
const decoded = (buffer) => ({ tahu: sparkplug.decodePayload(buffer), raw: Payload.toObject(Payload.decode(buffer), { longs: Number }) });

function decodeStdin() {
  let input = "";
  process.stdin.on("data", (chunk) => (input += chunk));
  process.stdin.on("end", () => {
    for (const line of input.split("\n").filter((l) => l.trim())) process.stdout.write(json(decoded(Buffer.from(line, "base64"))) + "\n");
  });
}

function connect(url, options) {
  const mqtt = require("mqtt");
  const client = mqtt.connect(url, { protocolVersion: 4, reconnectPeriod: 0, ...options });
  client.on("error", (err) => { console.error(`mqtt error: ${err.message}`); process.exit(2); });
  return client;
}

function listen(url, filter, seconds) {
  const client = connect(url, { clientId: `tahu-listener-${process.pid}` });
  client.on("connect", () => client.subscribe(filter, { qos: 1 }, () => console.error(`subscribed to ${filter}`)));
  client.on("message", (topic, buffer) => {
    if (topic.startsWith("spBv1.0/STATE/")) return;
    process.stdout.write(json({ topic, ...decoded(buffer) }) + "\n");
  });
  const stop = () => client.end(false, () => process.exit(0));
  setTimeout(stop, seconds * 1000);
  process.on("SIGTERM", stop);  // the test says when it has seen enough
}

function publish(url, group, node, device, count, intervalMs) {
  const base = `spBv1.0/${group}`;
  const bdSeq = 7;
  const will = { topic: `${base}/NDEATH/${node}`, payload: Buffer.from(sparkplug.encodePayload({ timestamp: Date.now(), metrics: [{ name: "bdSeq", type: "UInt64", value: bdSeq }] })), qos: 1 };
  const client = connect(url, { clientId: `tahu-node-${process.pid}`, will });
  let seq = 0;
  const send = (topic, payload) => new Promise((resolve) => client.publish(topic, Buffer.from(sparkplug.encodePayload({ ...payload, seq: seq++ % 256 })), { qos: 1 }, resolve));
  const sensor = (name, alias, value, birth, quality) => {
    const m = { alias, type: "Double", value, timestamp: Date.now() };
    if (birth) { m.name = name; m.properties = { engUnit: { type: "String", value: name === "temperature" ? "degC" : "%" } }; }
    if (quality !== undefined) m.properties = { ...(m.properties || {}), Quality: { type: "Int32", value: quality } };
    return m;
  };
  client.on("connect", async () => {
    const now = Date.now();
    await send(`${base}/NBIRTH/${node}`, { timestamp: now, metrics: [{ name: "bdSeq", type: "UInt64", value: bdSeq }, { name: "Node Control/Rebirth", type: "Boolean", value: false }] });
    const tick = 1000;
    await send(`${base}/DBIRTH/${node}/${device}`, { timestamp: now, metrics: [
      { name: "sensorfleet/seq", alias: 256, type: "UInt64", value: tick, timestamp: now },
      sensor("temperature", 257, 20.5, true), sensor("humidity", 258, 40.25, true)] });
    for (let i = 1; i <= count; i++) {
      await new Promise((r) => setTimeout(r, intervalMs));
      // the 3rd message has a humidity dropout: null with quality bad
      const dropout = i === 3;
      await send(`${base}/DDATA/${node}/${device}`, { timestamp: Date.now(), metrics: [
        { alias: 256, type: "UInt64", value: tick + i, timestamp: Date.now() },
        sensor("temperature", 257, 20.5 + i, false), sensor("humidity", 258, dropout ? null : 40.25 + i, false, dropout ? 0 : undefined)] });
    }
    await new Promise((resolve) => client.publish(`${base}/NDEATH/${node}`, will.payload, { qos: 1 }, resolve));
    client.end(false, () => process.exit(0));
  });
}

const [mode, ...args] = process.argv.slice(2);
if (mode === "decode") decodeStdin();
else if (mode === "listen") listen(args[0], args[1], Number(args[2]));
else if (mode === "publish") publish(args[0], args[1], args[2], args[3], Number(args[4]), Number(args[5] || 50));
else { console.error(`unknown mode ${mode}`); process.exit(1); }
