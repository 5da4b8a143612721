// Push log lines to Loki with winston + winston-loki, as a Node service would.
//
//   node push.js <host> <labels-json> <line>...
//
// <host> is the Loki base URL (winston-loki appends /loki/api/v1/push).
// json: false makes winston-loki send protobuf compressed with snappy. No
// credentials are configured: the proxy in front adds them. Exit status: 0
// when every push was answered 2xx, 1 when one failed, 2 on a timeout.
'use strict'

const winston = require('winston')
const LokiTransport = require('winston-loki')

const [host, labelsJson, ...lines] = process.argv.slice(2)
if (!host || !labelsJson || lines.length === 0) {
  console.error('usage: node push.js <host> <labels-json> <line>...')
  process.exit(64)
}

let failure = null
const transport = new LokiTransport({
  host,
  json: false,
  labels: JSON.parse(labelsJson),
  batching: true,
  interval: 3600, // only close() below sends: every line goes in one request
  gracefulShutdown: false,
  clearOnError: true,
  timeout: 10000,
  format: winston.format.printf(({ message }) => message),
  onConnectionError: (err) => {
    failure = err
  }
})
const logger = winston.createLogger({ level: 'info', transports: [transport] })

setTimeout(() => {
  console.error('winston-loki: timed out')
  process.exit(2)
}, 30000).unref()

// Winston hands entries to the transport asynchronously: wait until it has
// them all, then close(), which sends the batch and waits for the answer.
let logged = 0
transport.on('logged', async () => {
  if (++logged < lines.length) return
  await transport.close()
  if (failure) {
    console.error(`winston-loki: push failed: ${failure.message}`)
    process.exit(1)
  }
  console.log(`winston-loki: pushed ${lines.length} lines`)
  process.exit(0)
})
for (const line of lines) logger.info(line)
