'use strict';
// A Tether agent in Node.js, written from protos/tether/v1/agent.proto alone: no generated
// code, no SDK. It "sends" a batch of 100 emails every --every ms and holds the tether:
//
//   register (tenant, agent, run_id, instance_id) -> the grant: TTL, beat interval, and the
//     run's last checkpoint, which it resumes from;
//   a Beat every heartbeat_interval_ms, seq 1, 2, 3... (ack_seq 0 marks a push), carrying
//     the checkpoint whenever it changed;
//   ORDER_STOP with a halt (a kill, pushed inline) -> KillAck with the final checkpoint,
//     then Goodbye, then the end of its side: the instance ends KILLED, not STALE;
//   no beat confirmed within ttl_ms -> it fails closed by itself: no batch goes out until
//     a coordinator confirms ORDER_RUN again. A broken stream is reopened with the same
//     run_id and instance_id.
//
// Every line it prints on stdout is one JSON object with an "event" field.
//
//   node agent.js --target 127.0.0.1:7700 --run campaign-7 [--batches 50] [--every 2000]
// Exit codes: 0 finished or stopped by a signal (EXITED), 3 killed (KILLED), 2 refused.

const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { performance } = require('node:perf_hooks');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.join(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync('tether/v1/agent.proto', {
  includeDirs: [PROTOS],
  keepCase: true, // field names exactly as in the .proto: run_id, ack_seq, ttl_ms
  longs: Number,
  enums: String, // 'ORDER_STOP', not 2
  defaults: true,
  oneofs: true,
});
const { AgentService } = grpc.loadPackageDefinition(definition).tether.v1;
const { requestSerialize } = definition['tether.v1.AgentService'].Heartbeat;

// Retrying the same registration cannot fix these (see the .proto); anything else reconnects.
const PERMANENT = new Set([grpc.status.INVALID_ARGUMENT, grpc.status.FAILED_PRECONDITION]);
const EMAILS_PER_BATCH = 100;

process.stdout.on('error', () => {}); // a closed pipe (| head) must not crash the agent

function say(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

// google.protobuf.Struct, as proto-loader gives it, to and from plain JSON values. The
// well-known types come from protobufjs's own copies, so their fields are camelCase even
// with keepCase: numberValue, not number_value.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}

function toStruct(obj) {
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])) };
}

function fromValue(v) {
  if (v.kind === 'structValue') return fromStruct(v.structValue);
  if (v.kind === 'listValue') return v.listValue.values.map(fromValue);
  return v.kind === 'nullValue' ? null : v[v.kind];
}

function fromStruct(s) {
  return Object.fromEntries(Object.entries(s.fields || {}).map(([k, v]) => [k, fromValue(v)]));
}

class TetherAgent {
  constructor(opts) {
    this.opts = opts;
    this.targets = opts.target.split(',');
    this.attempt = 0;
    this.backoffMs = 50;
    this.register = {
      tenant: opts.tenant,
      agent: opts.agent,
      run_id: opts.run, // required: the checkpoint belongs to the run
      instance_id: opts.instance, // required: one per process, kept across reconnects
      capabilities: [opts.capability],
      labels: {},
    };
    this.progress = { batch: 0, sent: 0 }; // the checkpoint
    this.carried = null; // the checkpoint (as JSON) the current stream already carried
    this.seq = 0; // Beat.seq: the first beat is 1, because ack_seq 0 means a push
    this.beatsSent = new Map(); // seq -> when it was sent, until its ack comes
    this.confirmedAt = -Infinity; // when the newest confirmed beat was sent
    this.ttlMs = 0;
    this.order = 'ORDER_UNSPECIFIED';
    this.frozen = new Set(); // capabilities frozen by a halt that names one
    this.failedClosed = false;
    this.registered = false;
    this.ending = false;
    this.exitCode = 0;
    this.call = null;
    this.timers = [];
  }

  start() {
    this.connect();
    for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => this.finish('signal', 0));
  }

  connect() {
    const target = this.targets[this.attempt++ % this.targets.length];
    const client = new AgentService(target, grpc.credentials.createInsecure());
    const call = client.Heartbeat();
    this.call = call;
    this.carried = null; // a new stream gets the newest checkpoint with its first beat
    call.on('data', (resp) => this.onReply(call, resp));
    call.on('error', () => {}); // the status event says how it ended
    call.on('status', (status) => this.onStatus(call, client, status));
    call.write({ register: this.register }); // the first message, and only the first
  }

  onReply(call, resp) {
    const now = performance.now();
    if (resp.session) {
      this.onGrant(resp.session, now);
    } else if (resp.ack_seq) {
      const sentAt = this.beatsSent.get(resp.ack_seq);
      this.beatsSent.delete(resp.ack_seq);
      if (sentAt !== undefined) this.confirmedAt = Math.max(this.confirmedAt, sentAt);
    } // ack_seq 0, no session: a push. It carries the new order and confirms no beat.
    this.applyOrder(call, resp);
  }

  onGrant(grant, now) {
    this.ttlMs = grant.ttl_ms;
    this.maxCheckpointBytes = grant.max_checkpoint_bytes;
    this.confirmedAt = now;
    this.backoffMs = 50;
    if (!this.registered) {
      // Only the first grant of the process: later ones may hold an older checkpoint than
      // the progress this process has made since.
      this.registered = true;
      if (grant.has_checkpoint) this.progress = fromStruct(grant.checkpoint);
      say('registered', {
        session_id: grant.session_id,
        coordinator: grant.coordinator,
        ttl_ms: grant.ttl_ms,
        heartbeat_interval_ms: grant.heartbeat_interval_ms,
        resumed_from: grant.has_checkpoint ? this.progress : null,
      });
      this.every(this.opts.every, () => this.step());
      this.every(Math.max(this.ttlMs / 4, 50), () => this.watchTtl());
    } else {
      say('reconnected', { session_id: grant.session_id, coordinator: grant.coordinator });
    }
    clearInterval(this.beatTimer);
    this.beat();
    this.beatTimer = setInterval(() => this.beat(), grant.heartbeat_interval_ms);
  }

  applyOrder(call, resp) {
    this.order = resp.order;
    const frozen = new Set(resp.halts.map((h) => h.selector.capability).filter(Boolean));
    if ([...frozen].join() !== [...this.frozen].join()) {
      say('frozen', { capabilities: [...frozen] });
    }
    this.frozen = frozen;
    if (resp.order === 'ORDER_STOP') {
      const stopping = resp.halts.filter((h) => !h.selector.capability);
      if (resp.fail_closed_reason || stopping.length === 0) {
        this.failClosed(resp.fail_closed_reason || 'the coordinator ordered a stop');
      } else {
        this.killed(call, stopping[0]);
      }
    } else if (this.failedClosed && this.confirmed()) {
      this.failedClosed = false;
      say('running', { reason: 'a coordinator confirmed ORDER_RUN' });
    }
  }

  confirmed() {
    return performance.now() - this.confirmedAt <= this.ttlMs;
  }

  mayWork() {
    return (
      this.order === 'ORDER_RUN' &&
      this.confirmed() &&
      !this.failedClosed &&
      !this.frozen.has(this.opts.capability)
    );
  }

  step() {
    if (this.ending || !this.mayWork()) return;
    const batch = this.progress.batch;
    const next = { batch: batch + 1, sent: (batch + 1) * EMAILS_PER_BATCH };
    // The coordinator ends the stream on a checkpoint over the limit: refuse it here instead.
    const size = requestSerialize({ goodbye: { checkpoint: toStruct(next) } }).length;
    if (size > this.maxCheckpointBytes) return this.finish(`checkpoint of ${size} bytes`, 2);
    this.progress = next; // "sent" 100 emails
    say('batch', next);
    if (this.opts.batches && next.batch >= this.opts.batches) this.finish('done', 0);
  }

  beat() {
    if (this.ending || !this.call) return;
    const beat = { seq: ++this.seq };
    const checkpoint = JSON.stringify(this.progress);
    if (checkpoint !== this.carried) {
      beat.checkpoint = toStruct(this.progress); // only when it changed since the last one
      this.carried = checkpoint;
    }
    const now = performance.now();
    this.beatsSent.set(beat.seq, now);
    for (const [seq, at] of this.beatsSent) {
      if (now - at > 2 * this.ttlMs) this.beatsSent.delete(seq); // replies that never came
    }
    this.call.write({ beat });
  }

  watchTtl() {
    if (!this.ending && !this.failedClosed && !this.confirmed()) {
      this.failClosed(`no beat confirmed within ttl_ms (${this.ttlMs} ms)`);
    }
  }

  failClosed(reason) {
    if (this.failedClosed) return;
    this.failedClosed = true;
    say('fail_closed', { reason, checkpoint: this.progress });
  }

  killed(call, halt) {
    if (this.ending) return;
    this.ending = true;
    this.exitCode = 3;
    const { id, reason, actor, mode } = halt;
    say('killed', { halt_id: id, reason, actor, mode, checkpoint: this.progress });
    // Nothing is in flight between two batches, so a soft kill is acknowledged at once too.
    const checkpoint = toStruct(this.progress);
    call.write({ ack: { halt_id: id, escalated: false, in_flight: [], checkpoint, discarded: 0 } });
    call.write({ goodbye: { checkpoint } });
    call.end();
  }

  finish(why, code) {
    if (this.ending) return;
    this.ending = true;
    this.exitCode = code;
    say('goodbye', { why, checkpoint: this.progress });
    if (!this.call) return this.stop(code); // between streams: nothing to say goodbye on
    this.call.write({ goodbye: { checkpoint: toStruct(this.progress) } });
    this.call.end();
  }

  onStatus(call, client, status) {
    client.close();
    if (call !== this.call) return;
    const code = grpc.status[status.code];
    if (this.ending) {
      // OK: the coordinator stored the final checkpoint and the instance's end.
      say('ended', { confirmed: status.code === grpc.status.OK, code, details: status.details });
      this.stop(this.exitCode);
    } else if (PERMANENT.has(status.code)) {
      say('refused', { code, details: status.details });
      this.stop(2);
    } else {
      this.call = null;
      say('reconnecting', { code, details: status.details, in_ms: this.backoffMs });
      setTimeout(() => this.connect(), this.backoffMs);
      this.backoffMs = Math.min(this.backoffMs * 2, 2000);
    }
  }

  every(ms, fn) {
    this.timers.push(setInterval(fn, ms));
  }

  stop(code) {
    for (const timer of [...this.timers, this.beatTimer]) clearInterval(timer);
    process.exitCode = code;
  }
}

function options() {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: process.env.TETHER_ADDR || '127.0.0.1:7700' },
      tenant: { type: 'string', default: 'acme' },
      agent: { type: 'string', default: 'email-campaign' },
      run: { type: 'string', default: 'campaign-node' },
      instance: { type: 'string', default: `${os.hostname()}-${process.pid}` },
      capability: { type: 'string', default: 'send_email' },
      batches: { type: 'string', default: '0' }, // 0: until killed or stopped
      every: { type: 'string', default: '2000' }, // ms between batches
    },
  });
  // Names are 1-128 of letters, digits and . _ : @ -, starting with a letter or digit.
  values.instance = values.instance.replace(/[^A-Za-z0-9._:@-]/g, '-').slice(0, 128);
  return { ...values, batches: Number(values.batches), every: Number(values.every) };
}

new TetherAgent(options()).start();
