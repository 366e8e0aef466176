// MQTT over WebSockets with MQTT.js (node), as a browser-style client would connect: `wss` to
// the lobby's MQTT listener, path /mqtt, subprotocol mqtt, with the device's certificate.
// Run by tests/websockets.rs, which passes, by environment:
//   URL        wss://localhost:PORT/mqtt
//   CA, CERT, KEY  files: the lobby's CA, the device's certificate and key
//   CLIENT_ID  the MQTT client id;  VERSION  4 (3.1.1) or 5
//   ALPN       "http/1.1" to offer it, empty to offer no ALPN
// Prints one JSON line per event: {"event":"connected"}, then, for a v5 client that the lobby
// redirects, {"event":"disconnect","reasonCode":157,"serverReference":"host:port"}; exits
// when the connection ends. Errors print {"event":"error","message":…} and exit 1.
import fs from "node:fs";
import mqtt from "mqtt";

const env = process.env;
const tls = {
  ca: fs.readFileSync(env.CA),
  cert: fs.readFileSync(env.CERT),
  key: fs.readFileSync(env.KEY),
  servername: "localhost",
  rejectUnauthorized: true,
  ...(env.ALPN ? { ALPNProtocols: [env.ALPN] } : {}),
};
const say = (o) => console.log(JSON.stringify(o));
const client = mqtt.connect(env.URL, {
  protocolVersion: Number(env.VERSION || 5),
  clientId: env.CLIENT_ID,
  reconnectPeriod: 0,
  connectTimeout: 10000,
  ...tls,
  wsOptions: tls,
});
client.on("connect", () => say({ event: "connected" }));
client.on("disconnect", (packet) => {
  say({
    event: "disconnect",
    reasonCode: packet.reasonCode,
    serverReference: packet.properties?.serverReference ?? null,
  });
});
client.on("error", (e) => {
  say({ event: "error", message: String(e && e.message || e) });
  process.exit(1);
});
client.on("close", () => {
  say({ event: "closed" });
  process.exit(0);
});
