#!/usr/bin/env node
// A gradserve client in Node.js, written from docs/protocol.md alone (no generated
// code, no Python): it loads protos/gradserve/v1/gradserve.proto at run time with
// @grpc/proto-loader and speaks the wire contract as the spec describes it.
//
// Usage: node test.js HOST:PORT [path/to/wire_vectors.json]
// The server must serve gradserve.server.examples and tests/gradserve_test_functions.py
// (identity, dropout). Exit status 0 when every check passes, 1 otherwise.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const ROOT = path.resolve(__dirname, '..', '..');
const TARGET = process.argv[2] || '127.0.0.1:50051';
const GOLDEN = process.argv[3] || path.join(ROOT, 'tests', 'golden', 'wire_vectors.json');
const DEADLINE_MS = 30000;

// -- the contract ---------------------------------------------------------------------

const defs = protoLoader.loadSync(
  ['gradserve/v1/gradserve.proto', 'grpc/health/v1/health.proto', 'gradserve_node/decoders.proto'],
  {
    keepCase: true, // field names as in the .proto
    longs: String, // int64 / uint64 as decimal strings: no precision lost
    enums: Number, // DType as its number
    bytes: Buffer,
    defaults: true,
    oneofs: true, // the name of the set member of a oneof, e.g. msg.kind === 'tensor'
    includeDirs: [path.join(ROOT, 'protos'), path.join(__dirname, 'protos')],
  },
);
const api = grpc.loadPackageDefinition(defs);
const PKG = 'gradserve.v1';

// DType number -> bytes per element (docs/protocol.md, "Tensors").
const ITEMSIZE = {
  1: 1, 2: 1, 3: 1, 4: 2, 5: 4, 6: 8, 7: 2, 8: 2, 9: 4, 10: 8, 11: 8, 12: 16, 13: 2, 14: 4, 15: 8, 16: 1, 17: 1,
};
const FLOAT32 = 9;
const FLOAT64 = 10;

function nbytes(tensor) {
  const size = ITEMSIZE[tensor.dtype];
  if (size === undefined) throw new Error(`unknown dtype ${tensor.dtype}`);
  return tensor.shape.reduce((n, d) => n * Number(d), 1) * size;
}

// Stream slots: every gradserve.v1.Tensor inside a message, depth-first, fields in
// field-number order (docs/protocol.md, "StreamCall").
function resolveType(typeName, scope) {
  const name = typeName.replace(/^\./, '');
  return defs[name] ? name : `${scope}.${name}`;
}

function tensorSlots(typeName, message, out = []) {
  const fields = [...defs[typeName].type.field].sort((a, b) => a.number - b.number);
  for (const field of fields) {
    if (field.type !== 'TYPE_MESSAGE') continue;
    const value = message[field.name];
    const items = field.label === 'LABEL_REPEATED' ? value || [] : value ? [value] : [];
    const fieldType = resolveType(field.typeName, typeName.slice(0, typeName.lastIndexOf('.')));
    for (const item of items) {
      if (fieldType === `${PKG}.Tensor`) out.push(item);
      else tensorSlots(fieldType, item, out);
    }
  }
  return out;
}

// -- tensors --------------------------------------------------------------------------

function f64Tensor(values, shape, requiresGrad = false) {
  const data = Buffer.alloc(8 * values.length);
  values.forEach((v, i) => data.writeDoubleLE(v, 8 * i));
  return { dtype: FLOAT64, shape, data, requires_grad: requiresGrad };
}

function f64Values(tensor) {
  if (tensor.dtype !== FLOAT64) throw new Error(`expected DTYPE_FLOAT64, got ${tensor.dtype}`);
  if (tensor.data.length !== nbytes(tensor)) throw new Error(`${tensor.data.length} data bytes for shape [${tensor.shape}]`);
  const values = [];
  for (let i = 0; i < tensor.data.length; i += 8) values.push(tensor.data.readDoubleLE(i));
  return values;
}

const shapeOf = (tensor) => tensor.shape.map(Number);
const maybe = (tensor) => ({ tensor });
const grad = (maybeTensor) => (maybeTensor.kind === 'tensor' ? maybeTensor.tensor : null);

// -- calls ----------------------------------------------------------------------------

const client = new api.gradserve.v1.GradientService(TARGET, grpc.credentials.createInsecure(), {
  'grpc.max_receive_message_length': -1,
  'grpc.max_send_message_length': -1,
});
const health = new api.grpc.health.v1.Health(TARGET, grpc.credentials.createInsecure());

let requestCounter = 0;
function callOptions() {
  return { deadline: Date.now() + DEADLINE_MS };
}
function metadata() {
  const md = new grpc.Metadata();
  md.set('x-request-id', `node-${process.pid}-${++requestCounter}`);
  return md;
}

function unary(stub, method, request) {
  return new Promise((resolve, reject) => {
    stub[method](request, metadata(), callOptions(), (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// StreamCall: the header (the request with its tensors' data moved out), then the
// bytes in chunks of any size; the reply is read back the same way.
const STREAM_KIND = {
  forward: ['ForwardRequest', 'ForwardResponse'],
  backward: ['BackwardRequest', 'BackwardResponse'],
  forward_backward: ['ForwardBackwardRequest', 'ForwardBackwardResponse'],
};

function streamCall(kind, request, chunkBytes = 1 << 20) {
  const [requestType, responseType] = STREAM_KIND[kind].map((t) => `${PKG}.${t}`);
  const payload = Buffer.concat(
    tensorSlots(requestType, request).map((slot) => {
      const data = slot.data || Buffer.alloc(0);
      slot.data = Buffer.alloc(0);
      return data;
    }),
  );
  return new Promise((resolve, reject) => {
    const call = client.StreamCall(metadata(), callOptions());
    const replies = [];
    call.on('data', (m) => replies.push(m));
    call.on('error', reject);
    call.on('end', () => {
      try {
        const [first, ...rest] = replies;
        if (!first || first.part !== kind) throw new Error(`expected a ${kind} header first, got ${first && first.part}`);
        const header = first[kind];
        const slots = tensorSlots(responseType, header);
        if (slots.some((s) => s.data.length)) throw new Error('the response header carries tensor data');
        if (rest.some((m) => m.part !== 'data')) throw new Error('a non-data message after the response header');
        const data = Buffer.concat(rest.map((m) => m.data));
        const sizes = slots.map(nbytes);
        const total = sizes.reduce((a, b) => a + b, 0);
        if (data.length !== total) throw new Error(`response data is ${data.length} bytes, the header declares ${total}`);
        let offset = 0;
        slots.forEach((slot, i) => {
          slot.data = data.subarray(offset, offset + sizes[i]);
          offset += sizes[i];
        });
        resolve({ reply: header, chunks: rest.length });
      } catch (e) {
        reject(e);
      }
    });
    call.write({ [kind]: request });
    for (let start = 0; start < payload.length; start += chunkBytes) {
      call.write({ data: payload.subarray(start, start + chunkBytes) });
    }
    call.end();
  });
}

// A StreamCall of exactly these StreamRequest messages; resolves to the replies.
function rawStream(messages) {
  return new Promise((resolve, reject) => {
    const call = client.StreamCall(metadata(), callOptions());
    const replies = [];
    call.on('data', (m) => replies.push(m));
    call.on('error', reject);
    call.on('end', () => resolve(replies));
    for (const m of messages) call.write(m);
    call.end();
  });
}

// google.rpc.Status from the grpc-status-details-bin trailer; the ErrorInfo in it.
const decoders = defs['gradserve_node.Decoders'];
function errorInfo(err) {
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return null;
  const status = decoders.Status.responseDeserialize(bin);
  if (status.code !== err.code) throw new Error(`status detail code ${status.code} != call code ${err.code}`);
  const any = status.details.find((d) => d.type_url === 'type.googleapis.com/google.rpc.ErrorInfo');
  return any ? decoders.ErrorInfo.responseDeserialize(any.value) : null;
}

// -- checks ---------------------------------------------------------------------------

let failures = 0;
let passes = 0;
function check(ok, what, detail = '') {
  if (ok) passes += 1;
  else failures += 1;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}${!ok && detail ? `: ${detail}` : ''}`);
}
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const hex = (t) => t.data.toString('hex');

async function expectError(what, promise, code, reason) {
  try {
    await promise;
    check(false, what, 'the call succeeded');
  } catch (err) {
    if (err.code === undefined) throw err;
    const info = errorInfo(err);
    const got = `${grpc.status[err.code]} ${info && info.reason} ${info && info.domain}`;
    check(
      err.code === grpc.status[code] && info && info.reason === reason && info.domain === 'gradserve.dev',
      `${what}: ${code} / ${reason}`,
      `got ${got}: ${err.details}`,
    );
  }
}

async function main() {
  const started = Date.now();

  // Health and ListFunctions.
  const h = await unary(health, 'Check', { service: 'gradserve.v1.GradientService' });
  check(h.status === 1, 'health: gradserve.v1.GradientService is SERVING', `status ${h.status}`);
  const { functions } = await unary(client, 'ListFunctions', {});
  const byName = Object.fromEntries(functions.map((f) => [f.name, f]));
  for (const name of ['square', 'cube_plus_square', 'identity', 'scale', 'linear', 'dropout']) {
    check(name in byName && byName[name].unavailable_reason === '', `ListFunctions lists ${name}`);
  }
  check(byName.cube_plus_square.signature === '(x, y)' && byName.cube_plus_square.required_inputs === 2, 'cube_plus_square signature (x, y), 2 required', JSON.stringify(byName.cube_plus_square));
  check(byName.square.double_backward === true, 'square declares double_backward');

  // Seed examples, exact values.
  let r = await unary(client, 'ForwardBackward', {
    function: 'cube_plus_square',
    args: [{ tensor: f64Tensor([2], [], true) }, { tensor: f64Tensor([3], [], true) }],
  });
  check(same(f64Values(r.outputs[0]), [17]) && shapeOf(r.outputs[0]).length === 0, 'cube_plus_square(2, 3) = 17 (float64 scalar)', JSON.stringify(r.outputs));
  check(r.returns_tuple === false, 'cube_plus_square returns a bare tensor');
  check(
    r.grads.length === 2 && same(f64Values(grad(r.grads[0])), [12]) && same(f64Values(grad(r.grads[1])), [6]),
    'df/dx = 12, df/dy = 6',
  );
  r = await unary(client, 'ForwardBackward', { function: 'square', args: [{ tensor: f64Tensor([1], [], true) }] });
  check(same(f64Values(r.outputs[0]), [1]) && same(f64Values(grad(r.grads[0])), [2]), 'square(1) = 1, gradient 2');

  // Golden wire vectors: identity echoes the bytes; scale by 2.0 doubles them.
  const golden = JSON.parse(fs.readFileSync(GOLDEN, 'utf8'));
  for (const v of golden.tensors) {
    const tensor = { dtype: v.number, shape: v.shape, data: Buffer.from(v.hex, 'hex') };
    const id = `${v.dtype}[${v.shape}]`;
    const f = await unary(client, 'Forward', { function: 'identity', args: [{ tensor }] });
    const out = f.outputs[0];
    check(out.dtype === v.number && same(shapeOf(out), v.shape) && hex(out) === v.hex, `golden identity ${id}`, `${out.dtype} [${out.shape}] ${hex(out)}`);
    if ('doubled' in v) {
      const s = await unary(client, 'Forward', { function: 'scale', args: [{ tensor }, { float_value: 2.0 }] });
      const d = s.outputs[0];
      check(d.dtype === v.number && same(shapeOf(d), v.shape) && hex(d) === v.doubled, `golden scale(k = 2.0) ${id}`, hex(d));
    }
  }
  for (const c of golden.calls) {
    const args = c.args.map((a) => ({ tensor: { dtype: a.number, shape: a.shape, data: Buffer.from(a.hex, 'hex'), requires_grad: a.requires_grad } }));
    const fb = await unary(client, 'ForwardBackward', { function: c.function, args });
    const outs = fb.outputs.map((t) => ({ number: t.dtype, shape: shapeOf(t), hex: hex(t) }));
    const grads = fb.grads.map((g) => ({ number: g.tensor.dtype, shape: shapeOf(g.tensor), hex: hex(g.tensor) }));
    check(same(outs, c.outputs) && same(grads, c.grads), `golden ForwardBackward ${c.function}`, JSON.stringify({ outs, grads }));
  }

  // A 6 MiB float32 tensor through StreamCall (ForwardBackward of square), in chunks of
  // 1,000,000 bytes (any size is allowed), reply assembled from the response chunks.
  const n = (6 * 1024 * 1024) / 4;
  const xs = Buffer.alloc(4 * n);
  for (let i = 0; i < n; i++) xs.writeFloatLE((i % 4096) - 2048, 4 * i); // squares stay exact in float32
  const t0 = Date.now();
  const streamed = await streamCall(
    'forward_backward',
    { function: 'square', args: [{ tensor: { dtype: FLOAT32, shape: [n], data: xs, requires_grad: true } }] },
    1000000,
  );
  const ms = Date.now() - t0;
  const [y] = streamed.reply.outputs;
  const g = grad(streamed.reply.grads[0]);
  let bad = 0;
  for (let i = 0; i < n && bad < 5; i++) {
    const x = (i % 4096) - 2048;
    if (y.data.readFloatLE(4 * i) !== x * x || g.data.readFloatLE(4 * i) !== 2 * x) bad += 1;
  }
  check(
    y.dtype === FLOAT32 && same(shapeOf(y), [n]) && g.dtype === FLOAT32 && same(shapeOf(g), [n]) && bad === 0,
    `StreamCall square on 6 MiB float32: x^2 and 2x exact for all ${n} elements (${streamed.chunks} response chunks, ${ms} ms)`,
    `${bad} wrong`,
  );

  // Slot order of a streamed ForwardBackward: args, grad_outputs, then kwargs.
  // linear(x [2,3], weight [4,3], bias=[4] by name), cotangent g [2,4].
  const X = [1, 2, 3, 4, 5, 6];
  const W = [1, 0, -1, 2, 1, 0, 0, 3, 1, -2, 1, 1];
  const B = [0.5, -1, 2, 0];
  const G = [1, -1, 2, 0, 0.5, 1, -1, 3];
  const lin = await streamCall('forward_backward', {
    function: 'linear',
    args: [{ tensor: f64Tensor(X, [2, 3], true) }, { tensor: f64Tensor(W, [4, 3], true) }],
    grad_outputs: [maybe(f64Tensor(G, [2, 4]))],
    kwargs: [{ name: 'bias', value: { tensor: f64Tensor(B, [4], true) } }],
  });
  const at = (m, cols, i, j) => m[i * cols + j];
  const expectY = [];
  const expectDx = [];
  const expectDw = [];
  for (let i = 0; i < 2; i++) for (let o = 0; o < 4; o++) expectY.push([0, 1, 2].reduce((s, k) => s + at(X, 3, i, k) * at(W, 3, o, k), B[o]));
  for (let i = 0; i < 2; i++) for (let k = 0; k < 3; k++) expectDx.push([0, 1, 2, 3].reduce((s, o) => s + at(G, 4, i, o) * at(W, 3, o, k), 0));
  for (let o = 0; o < 4; o++) for (let k = 0; k < 3; k++) expectDw.push([0, 1].reduce((s, i) => s + at(G, 4, i, o) * at(X, 3, i, k), 0));
  const expectDb = [0, 1, 2, 3].map((o) => at(G, 4, 0, o) + at(G, 4, 1, o));
  const lg = lin.reply.grads.map(grad);
  check(
    same(f64Values(lin.reply.outputs[0]), expectY) &&
      same(f64Values(lg[0]), expectDx) &&
      same(f64Values(lg[1]), expectDw) &&
      same(f64Values(lg[2]), expectDb) &&
      same(shapeOf(lg[2]), [4]),
    'StreamCall linear: slot order args, grad_outputs, kwargs; gradients positional then keyword',
    JSON.stringify(lin.reply),
  );

  // Handles: Forward keeps the graph; Backward by handle consumes it.
  const x3 = [3, -1, 0.5];
  const f = await unary(client, 'Forward', { function: 'square', args: [{ tensor: f64Tensor(x3, [3], true) }], keep_graph: true });
  check(f.handle !== '' && Number(f.handle_ttl_ms) > 0 && f.version !== '', 'Forward keep_graph returns a handle, its TTL and the version');
  const g1 = [1, 2, -1];
  const b = await unary(client, 'Backward', { function: 'square', handle: f.handle, version: f.version, grad_outputs: [maybe(f64Tensor(g1, [3]))] });
  check(same(f64Values(grad(b.grads[0])), [6, -4, -1]), 'Backward by handle: 2 x g');
  await expectError('Backward with a used handle', unary(client, 'Backward', { function: 'square', handle: f.handle }), 'NOT_FOUND', 'HANDLE_NOT_FOUND');
  const f1 = await unary(client, 'Forward', { function: 'square', args: [{ tensor: f64Tensor(x3, [3], true) }], keep_graph: true });
  await expectError(
    'Backward by handle with a wrongly shaped cotangent',
    unary(client, 'Backward', { function: 'square', handle: f1.handle, grad_outputs: [maybe(f64Tensor([1], [1]))] }),
    'INVALID_ARGUMENT',
    'INVALID_ARGUMENT',
  );
  const b1 = await unary(client, 'Backward', { function: 'square', handle: f1.handle });
  check(same(f64Values(grad(b1.grads[0])), [6, -2, 1]), 'INVALID_ARGUMENT leaves the handle usable; empty grad_outputs means ones');
  let rel = await unary(client, 'ReleaseHandles', { handles: [f.handle] });
  check(rel.released === 0, 'ReleaseHandles of a used handle releases 0');
  const f2 = await unary(client, 'Forward', { function: 'square', args: [{ tensor: f64Tensor(x3, [3], true) }], keep_graph: true });
  rel = await unary(client, 'ReleaseHandles', { handles: [f2.handle, f2.handle] });
  const rel2 = await unary(client, 'ReleaseHandles', { handles: [f2.handle] });
  check(rel.released === 1 && rel2.released === 0, 'ReleaseHandles is idempotent (1, then 0)');
  const rb = await unary(client, 'Backward', {
    function: 'square',
    recompute: { values: [{ tensor: f64Tensor(x3, [3], true) }] },
    version: f.version,
    grad_outputs: [maybe(f64Tensor(g1, [3]))],
  });
  check(same(f64Values(grad(rb.grads[0])), [6, -4, -1]), 'Backward by recompute gives the same gradient');

  // Second order of square: by handle (keep_graph) and by recompute (lower_order), streamed.
  const g2 = [0.5, 1, 4];
  const expectX = x3.map((_, i) => 2 * g1[i] * g2[i]); // d/dx (2 x g1 . g2)
  const expectG1 = x3.map((x, i) => 2 * x * g2[i]); // d/dg1
  const h0 = await unary(client, 'Forward', { function: 'square', args: [{ tensor: f64Tensor(x3, [3], true) }], keep_graph: true });
  const o1 = await unary(client, 'Backward', { function: 'square', handle: h0.handle, grad_outputs: [maybe(f64Tensor(g1, [3], true))], keep_graph: true });
  check(o1.handle !== '' && grad(o1.grads[0]).requires_grad === true, 'Backward keep_graph returns a handle of order 2');
  const o2 = await unary(client, 'Backward', { function: 'square', handle: o1.handle, grad_outputs: [maybe(f64Tensor(g2, [3]))] });
  check(o2.grads.length === 2 && same(f64Values(grad(o2.grads[0])), expectX) && same(f64Values(grad(o2.grads[1])), expectG1), 'order 2 by handle: grads for x and for g1');
  const o2r = await streamCall('backward', {
    function: 'square',
    recompute: { values: [{ tensor: f64Tensor(x3, [3], true) }] },
    grad_outputs: [maybe(f64Tensor(g2, [3]))],
    lower_order: [{ values: [maybe(f64Tensor(g1, [3], true))] }],
  });
  const o2g = o2r.reply.grads.map(grad);
  check(same(f64Values(o2g[0]), expectX) && same(f64Values(o2g[1]), expectG1), 'order 2 by recompute (streamed; slots x, grad_outputs, lower_order) matches');

  // Randomness replay: dropout's recompute redraws the same mask when rng is sent back.
  const ones = Array(64).fill(1);
  const d = await unary(client, 'Forward', { function: 'dropout', args: [{ tensor: f64Tensor(ones, [64], true) }] });
  check(d.rng !== null && d.rng.device_type !== '' && d.rng.torch_version !== '', 'Forward of dropout returns rng');
  const dr = await unary(client, 'Backward', {
    function: 'dropout',
    recompute: { values: [{ tensor: f64Tensor(ones, [64], true) }] },
    rng: d.rng,
  });
  check(same(f64Values(grad(dr.grads[0])), f64Values(d.outputs[0])), 'Backward by recompute with rng replays the mask (grad of sum = output at x = 1)');
  await expectError(
    'recompute with rng of another device type',
    unary(client, 'Backward', { function: 'dropout', recompute: { values: [{ tensor: f64Tensor(ones, [64], true) }] }, rng: { ...d.rng, device_type: 'other' } }),
    'FAILED_PRECONDITION',
    'RNG_MISMATCH',
  );

  // Errors.
  await expectError('unknown function', unary(client, 'Forward', { function: 'no_such_function', args: [] }), 'NOT_FOUND', 'FUNCTION_NOT_FOUND');
  await expectError(
    'tensor with a wrong byte count',
    unary(client, 'Forward', { function: 'identity', args: [{ tensor: { dtype: FLOAT32, shape: [2], data: Buffer.alloc(4) } }] }),
    'INVALID_ARGUMENT',
    'INVALID_ARGUMENT',
  );
  await expectError(
    'DTYPE_UNSPECIFIED',
    unary(client, 'Forward', { function: 'identity', args: [{ tensor: { dtype: 0, shape: [0] } }] }),
    'INVALID_ARGUMENT',
    'INVALID_ARGUMENT',
  );
  await expectError(
    'Backward naming another version',
    unary(client, 'Backward', { function: 'square', recompute: { values: [{ tensor: f64Tensor([1], [], true) }] }, version: 'not-this-one' }),
    'FAILED_PRECONDITION',
    'VERSION_MISMATCH',
  );
  await expectError('StreamCall unknown function', streamCall('forward', { function: 'no_such_function' }), 'NOT_FOUND', 'FUNCTION_NOT_FOUND');

  // Stream framing errors, with hand-made message sequences.
  const header = (shape, data) => ({ forward: { function: 'identity', args: [{ tensor: { dtype: FLOAT32, shape, data } }] } });
  const four = Buffer.alloc(16);
  await expectError('StreamCall starting with data', rawStream([{ data: four }]), 'INVALID_ARGUMENT', 'INVALID_ARGUMENT');
  await expectError('StreamCall header carrying data', rawStream([header([4], four)]), 'INVALID_ARGUMENT', 'INVALID_ARGUMENT');
  await expectError('StreamCall with a second header', rawStream([header([4]), header([4])]), 'INVALID_ARGUMENT', 'INVALID_ARGUMENT');
  await expectError('StreamCall with more data than declared', rawStream([header([4]), { data: four }, { data: four }]), 'INVALID_ARGUMENT', 'INVALID_ARGUMENT');
  await expectError('StreamCall with less data than declared', rawStream([header([4]), { data: four.subarray(0, 12) }]), 'INVALID_ARGUMENT', 'INVALID_ARGUMENT');
  await expectError('StreamCall declaring 4 TiB', rawStream([header([2 ** 40])]), 'RESOURCE_EXHAUSTED', 'TENSOR_TOO_LARGE');
  const ok = await rawStream([header([4]), { data: four.subarray(0, 5) }, { data: four.subarray(5) }]);
  check(ok.length === 2 && ok[0].part === 'forward' && ok[1].data.equals(four), 'StreamCall: a tensor cut across chunks comes back whole');

  console.log(`\n${passes} passed, ${failures} failed in ${Date.now() - started} ms (target ${TARGET})`);
}

main()
  .catch((err) => {
    failures += 1;
    console.log(`FAIL unexpected error: ${err.code !== undefined ? `${grpc.status[err.code]}: ${err.details}` : err.stack}`);
  })
  .finally(() => {
    client.close();
    health.close();
    process.exitCode = failures ? 1 : 0;
  });
