// A Foxglove WebSocket client that no one on this project wrote: Foxglove's own @foxglove/ws-protocol
// client, @foxglove/rosmsg's ROS 2 .msg parser and @foxglove/rosmsg2-serialization's CDR reader
// (the libraries the Foxglove app decodes ROS 2 data with). It subscribes to every channel the
// server advertises, decodes each message by its channel's schema, and prints one JSON summary.
//
// usage: node client.js ws://127.0.0.1:PORT IDLE_MS MAX_MS  (ends IDLE_MS after the last message,
// or after MAX_MS)
// stderr "subscribed <n>" each time it subscribes; stdout: {"channels": {topic: {...}}, ...}
"use strict";

const { FoxgloveClient } = require("@foxglove/ws-protocol");
const { parse } = require("@foxglove/rosmsg");
const { MessageReader } = require("@foxglove/rosmsg2-serialization");
const WebSocket = require("ws");

const [url, idleArg, maxArg] = process.argv.slice(2);
const idleMs = Number(idleArg || 3000);
const maxMs = Number(maxArg || 60000);
const decoder = new TextDecoder();
const channels = new Map(); // channel id -> {topic, encoding, schemaName, decode}
const bySubscription = new Map(); // subscription id -> channel id
const out = { serverInfo: null, channels: {}, errors: [] };

function summarize(value) {
  // Keep the printout small: long arrays (audio, pixels) become their length.
  if (value instanceof Uint8Array || value instanceof Int8Array) return { bytes: value.length };
  if (Array.isArray(value)) return value.length > 16 ? { items: value.length } : value.map(summarize);
  if (typeof value === "bigint") return value.toString();
  if (value && typeof value === "object") {
    const result = {};
    for (const [k, v] of Object.entries(value)) result[k] = summarize(v);
    return result;
  }
  return value;
}

function makeDecoder(channel) {
  if (channel.encoding === "cdr" && channel.schemaEncoding === "ros2msg") {
    const reader = new MessageReader(parse(channel.schema, { ros2: true }));
    return (data) => reader.readMessage(data);
  }
  if (channel.encoding === "json") return (data) => JSON.parse(decoder.decode(data));
  throw new Error(`no decoder for ${channel.encoding}/${channel.schemaEncoding}`);
}

// foxglove-sdk's server (0.30) accepts only the "foxglove.sdk.v1" subprotocol, the successor of
// "foxglove.websocket.v1" that this client library (0.8.0, the newest on npm) names: offer both,
// the server picks the one it speaks (RFC 6455 section 1.9).
const SUBPROTOCOLS = ["foxglove.sdk.v1", FoxgloveClient.SUPPORTED_SUBPROTOCOL];
const ws = new WebSocket(url, SUBPROTOCOLS);
const client = new FoxgloveClient({ ws });
let idleTimer = null;
function finish() {
  client.close();
  // Exit only once the pipe has taken everything (stdout to a pipe is asynchronous in node).
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(0));
}
function touch() {
  if (idleTimer) clearTimeout(idleTimer);
  idleTimer = setTimeout(finish, idleMs);
}
setTimeout(finish, maxMs);

client.on("error", (error) => out.errors.push(String(error && error.message ? error.message : error)));
client.on("serverInfo", (info) => {
  out.serverInfo = { name: info.name, capabilities: info.capabilities };
});
client.on("advertise", (advertised) => {
  for (const channel of advertised) {
    let decode;
    try {
      decode = makeDecoder(channel);
    } catch (error) {
      out.errors.push(`${channel.topic}: ${error.message}`);
      continue;
    }
    channels.set(channel.id, { ...channel, decode });
    out.channels[channel.topic] = {
      schemaName: channel.schemaName,
      encoding: channel.encoding,
      schemaEncoding: channel.schemaEncoding,
      count: 0,
      logTimes: [],
      messages: [],
    };
    bySubscription.set(client.subscribe(channel.id), channel.id);
  }
  process.stderr.write(`subscribed ${bySubscription.size}\n`);
});
client.on("message", ({ subscriptionId, timestamp, data }) => {
  const channel = channels.get(bySubscription.get(subscriptionId));
  if (!channel) return;
  const entry = out.channels[channel.topic];
  entry.count += 1;
  try {
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const message = channel.decode(bytes);
    if (entry.messages.length < 400) {
      entry.messages.push(summarize(message));
      entry.logTimes.push(timestamp.toString());
    }
  } catch (error) {
    out.errors.push(`${channel.topic}: decode failed: ${error.message}`);
  }
  touch();
});
