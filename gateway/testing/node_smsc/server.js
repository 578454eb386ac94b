#!/usr/bin/env node
// A test SMSC on the npm `smpp` package (node-smpp): SMPP code that is not the gateway's own.
//
//   node server.js [--host 127.0.0.1] [--port 0] [--system-id gateway] [--password secret]
//                  [--message-id-format hex|decimal] [--receipt-id-format same|hex|decimal]
//                  [--receipt-delay-ms 0] [--redeliver-delay-ms -1] [--redeliver-times 3] [--log all|none]
//
// stdout, one JSON object a line: first {"event":"listening","port":P}; then every PDU received
// ({"event":"pdu","command":"submit_sm",...} with the answer it got under "response"), every
// deliver_sm sent ({"event":"sent",...}) and the client's deliver_sm_resp ({"event":"pdu",
// "command":"deliver_sm_resp","status":S,...}). With --log none only the control answers and
// errors are written (for benchmarks; ask {"op":"stats"} for the counts). With
// --redeliver-delay-ms >= 0, a deliver_sm the client answers with an error status (such as
// ESME_RX_T_APPN) is sent again after that delay, up to --redeliver-times more times.
//
// stdin, one JSON object a line (an optional "ref" is echoed back in the answer):
//   {"op":"mo","source":"13800138000","destination":"106900123451234","text":"1",
//    "hex":"<raw short_message bytes>","udh":"050003070201","data_coding":8}
//   {"op":"receipt","message_id":"1a2b","state":"UNDELIV","err":"001","source":"…","destination":"…"}
//   {"op":"unbind"}  {"op":"close"}  {"op":"stats"}
// Each is answered with {"event":"sent"|"done"|"stats"|"error","ref":…,…}.
'use strict';

const readline = require('readline');
const smpp = require('smpp');

// Hand short_message and message_payload through as raw bytes in both directions: the tests
// check the exact UCS-2 bytes and UDH the gateway sent, not node-smpp's decoding of them.
for (const name of Object.keys(smpp.commands)) {
  const params = smpp.commands[name].params || {};
  if (params.short_message) delete params.short_message.filter;
}
delete smpp.tlvs.message_payload.filter;

const HEAD = new Set(['command_length', 'command_id', 'command_status', 'sequence_number', 'command']);
const STATES = {
  ENROUTE: 1, DELIVRD: 2, EXPIRED: 3, DELETED: 4, UNDELIV: 5, ACCEPTD: 6, UNKNOWN: 7, REJECTD: 8,
};

function parseArgs(argv) {
  const options = {
    host: '127.0.0.1', port: 0, systemId: 'gateway', password: 'secret',
    messageIdFormat: 'hex', receiptIdFormat: 'same', receiptDelayMs: 0, redeliverDelayMs: -1, redeliverTimes: 3,
    log: 'all',
  };
  const names = {
    '--host': 'host', '--port': 'port', '--system-id': 'systemId', '--password': 'password',
    '--message-id-format': 'messageIdFormat', '--receipt-id-format': 'receiptIdFormat',
    '--receipt-delay-ms': 'receiptDelayMs', '--redeliver-delay-ms': 'redeliverDelayMs',
    '--redeliver-times': 'redeliverTimes', '--log': 'log',
  };
  for (let i = 2; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) {
      process.stderr.write(`server.js: unknown or incomplete option ${argv[i]}\n`);
      process.exit(2);
    }
    options[key] = argv[i + 1];
  }
  options.port = Number(options.port);
  options.receiptDelayMs = Number(options.receiptDelayMs);
  options.redeliverDelayMs = Number(options.redeliverDelayMs);
  options.redeliverTimes = Number(options.redeliverTimes);
  if (!['hex', 'decimal'].includes(options.messageIdFormat)) {
    process.stderr.write('server.js: --message-id-format is hex or decimal\n');
    process.exit(2);
  }
  return options;
}

const options = parseArgs(process.argv);
const logAll = options.log === 'all';
const stats = { submits: 0, accepted: 0, deliver_sm_sent: 0, deliver_sm_resp: 0, binds: 0 };
let nextMessageId = 0xA0000; // hex a0000 = decimal 655360: the two formats never look alike
let sessionCount = 0;
let latestReceiver = null; // the session MOs and receipts go to, unless the submit's own can take them
const submitted = new Map(); // message id -> what the receipt needs to say

function emit(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

function formatId(number, format) {
  return format === 'decimal' ? String(number) : number.toString(16);
}

function receiptTextId(messageId) {
  if (options.receiptIdFormat === 'same') return messageId;
  const number = options.messageIdFormat === 'hex' ? parseInt(messageId, 16) : parseInt(messageId, 10);
  if (Number.isNaN(number)) return messageId;
  // Some SMSCs answer submit_sm in hex and report the receipt in zero-padded decimal.
  return options.receiptIdFormat === 'decimal' ? String(number).padStart(10, '0') : number.toString(16);
}

function describe(pdu, session) {
  const record = { event: 'pdu', connection: session.number, command: pdu.command, sequence: pdu.sequence_number,
    status: pdu.command_status };
  const optional = {};
  for (const key of Object.keys(pdu)) {
    if (HEAD.has(key)) continue;
    let value = pdu[key];
    if (Buffer.isBuffer(value)) value = value.toString('hex');
    const params = (smpp.commands[pdu.command] || {}).params || {};
    if (key in params) record[key] = value;
    else optional[key] = value;
  }
  if (Object.keys(optional).length) record.optional = optional;
  return record;
}

function canReceive(session) {
  return session && session.bound && session.mode !== 'transmitter' && !session.closed;
}

function receiverFor(session) {
  if (canReceive(session)) return session;
  return canReceive(latestReceiver) ? latestReceiver : null;
}

function smscTime(date) {
  const pad = (n) => String(n).padStart(2, '0');
  return pad(date.getUTCFullYear() % 100) + pad(date.getUTCMonth() + 1) + pad(date.getUTCDate()) +
    pad(date.getUTCHours()) + pad(date.getUTCMinutes());
}

function sendDeliver(session, fields, kind, ref, attempt = 1) {
  const target = receiverFor(session);
  if (!target) {
    emit({ event: 'error', ref, error: 'no bound receiver or transceiver session to deliver to' });
    return;
  }
  const sent = target.deliver_sm(fields, (resp) => {
    stats.deliver_sm_resp += 1;
    if (logAll || resp.command_status) {
      emit({ event: 'pdu', connection: target.number, command: 'deliver_sm_resp', sequence: resp.sequence_number,
        status: resp.command_status, kind });
    }
    if (resp.command_status && options.redeliverDelayMs >= 0 && attempt <= options.redeliverTimes) {
      setTimeout(() => sendDeliver(null, fields, kind, undefined, attempt + 1), options.redeliverDelayMs);
    }
  }, (pdu) => {
    stats.deliver_sm_sent += 1;
    emit({ event: 'sent', ref, connection: target.number, command: 'deliver_sm', kind, attempt,
      sequence: pdu.sequence_number,
      source_addr: fields.source_addr, destination_addr: fields.destination_addr,
      short_message: fields.short_message.toString('hex'), receipted_message_id: fields.receipted_message_id });
  });
  if (!sent) emit({ event: 'error', ref, error: 'the receiving session is not writable' });
}

function sendReceipt(session, { messageId, state = 'DELIVRD', err = '000', source = '', destination = '',
  text = '', submitDate = new Date(), ref }) {
  const stateCode = STATES[state];
  if (!stateCode) {
    emit({ event: 'error', ref, error: `unknown receipt state ${state}; one of ${Object.keys(STATES).join(' ')}` });
    return;
  }
  const delivered = state === 'DELIVRD' ? '001' : '000';
  const body = `id:${receiptTextId(messageId)} sub:001 dlvrd:${delivered} submit date:${smscTime(submitDate)} ` +
    `done date:${smscTime(new Date())} stat:${state} err:${err} text:${text}`;
  sendDeliver(session, {
    source_addr: source, // the receipt comes from the phone the message went to
    destination_addr: destination,
    esm_class: 0x04,
    data_coding: 0,
    short_message: Buffer.from(body, 'ascii'),
    receipted_message_id: messageId,
    message_state: stateCode,
  }, 'receipt', ref);
}

function receiptTextOf(pdu) {
  // The first 20 characters, as plain ASCII: many SMSCs copy the start of the message here.
  const data = Buffer.isBuffer(pdu.short_message) ? pdu.short_message : Buffer.alloc(0);
  let payload = data;
  if (pdu.esm_class & 0x40 && data.length) payload = data.slice(data[0] + 1);
  const text = pdu.data_coding === 8
    ? Buffer.from(payload.slice(0, payload.length & ~1)).swap16().toString('utf16le')
    : payload.toString('latin1');
  return text.replace(/[^\x20-\x7e]/g, '?').slice(0, 20);
}

function onSubmit(session, pdu) {
  stats.submits += 1;
  const record = logAll ? describe(pdu, session) : null;
  if (!session.bound || session.mode === 'receiver') {
    session.send(pdu.response({ command_status: smpp.ESME_RINVBNDSTS }));
    if (record) emit({ ...record, response: { status: smpp.ESME_RINVBNDSTS } });
    return;
  }
  const messageId = formatId(nextMessageId++, options.messageIdFormat);
  stats.accepted += 1;
  session.send(pdu.response({ message_id: messageId }));
  if (record) emit({ ...record, response: { status: 0, message_id: messageId } });
  const wanted = pdu.registered_delivery & 0x03;
  if (wanted === 1) {
    const receipt = {
      messageId, source: pdu.destination_addr, destination: pdu.source_addr,
      text: receiptTextOf(pdu), submitDate: new Date(),
    };
    setTimeout(() => sendReceipt(session, receipt), options.receiptDelayMs);
  }
}

function onBind(session, pdu, mode) {
  if (pdu.system_id !== options.systemId || pdu.password !== options.password) {
    const status = pdu.system_id !== options.systemId ? smpp.ESME_RINVSYSID : smpp.ESME_RINVPASWD;
    session.send(pdu.response({ command_status: status }));
    if (logAll) emit({ ...describe(pdu, session), password: undefined, response: { status } });
    return;
  }
  session.bound = true;
  session.mode = mode;
  stats.binds += 1;
  if (mode !== 'transmitter') latestReceiver = session;
  session.send(pdu.response({ system_id: 'node-smsc' }));
  if (logAll) emit({ ...describe(pdu, session), password: undefined, response: { status: 0 } });
}

const server = smpp.createServer((session) => {
  session.bound = false;
  session.closed = false;
  session.number = ++sessionCount;
  session.on('error', (error) => emit({ event: 'session_error', error: String(error && error.message) }));
  session.on('close', () => {
    session.closed = true;
    if (logAll) emit({ event: 'closed', connection: session.number });
  });
  session.on('bind_transceiver', (pdu) => onBind(session, pdu, 'transceiver'));
  session.on('bind_transmitter', (pdu) => onBind(session, pdu, 'transmitter'));
  session.on('bind_receiver', (pdu) => onBind(session, pdu, 'receiver'));
  session.on('submit_sm', (pdu) => onSubmit(session, pdu));
  session.on('enquire_link', (pdu) => {
    if (logAll) emit(describe(pdu, session));
    session.send(pdu.response());
  });
  session.on('unbind', (pdu) => {
    if (logAll) emit(describe(pdu, session));
    session.bound = false;
    session.send(pdu.response(), () => session.close());
  });
  session.on('unbind_resp', (pdu) => {
    if (logAll) emit(describe(pdu, session));
    session.close();
  });
  session.on('generic_nack', (pdu) => emit(describe(pdu, session)));
  session.on('unknown', (pdu) => {
    emit(describe(pdu, session));
    session.send(pdu.response());
  });
});

function onControl(line) {
  if (!line.trim()) return;
  let command;
  try {
    command = JSON.parse(line);
  } catch (error) {
    emit({ event: 'error', error: `control line is not JSON: ${error.message}` });
    return;
  }
  const ref = command.ref;
  switch (command.op) {
    case 'mo': {
      let message = command.hex !== undefined ? Buffer.from(command.hex, 'hex')
        : Buffer.from(command.text || '', 'utf16le').swap16();
      const udh = command.udh ? Buffer.from(command.udh, 'hex') : Buffer.alloc(0);
      message = Buffer.concat([udh, message]);
      const fields = {
        source_addr: command.source || '', destination_addr: command.destination || '',
        esm_class: command.esm_class !== undefined ? command.esm_class : (udh.length ? 0x40 : 0),
        data_coding: command.data_coding !== undefined ? command.data_coding : 8,
        short_message: message,
      };
      sendDeliver(null, fields, 'mo', ref);
      break;
    }
    case 'receipt':
      sendReceipt(null, { messageId: command.message_id, state: command.state, err: command.err,
        source: command.source, destination: command.destination, text: command.text, ref });
      break;
    case 'unbind':
    case 'close': {
      let count = 0;
      for (const session of server.sessions.slice()) {
        count += 1;
        if (command.op === 'unbind') session.unbind();
        else session.destroy();
      }
      emit({ event: 'done', ref, op: command.op, sessions: count });
      break;
    }
    case 'stats':
      emit({ event: 'stats', ref, ...stats });
      break;
    default:
      emit({ event: 'error', ref, error: `unknown op ${command.op}; one of mo receipt unbind close stats` });
  }
}

server.on('error', (error) => {
  process.stderr.write(`server.js: ${error.message}\n`);
  process.exit(1);
});
server.listen(options.port, options.host, () => {
  emit({ event: 'listening', host: options.host, port: server.address().port });
  const input = readline.createInterface({ input: process.stdin });
  input.on('line', onControl);
  input.on('close', () => process.exit(0)); // the test that started us is gone
});
