// Conformance check: js-libp2p dials a running p2pspec peer.
//
//     node dial.mjs /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID
//
// Dials over TCP with Noise and yamux (nothing else offered), waits for the identify
// exchange with that peer, pings it, and prints ONE JSON line on stdout:
//
//     {"agentVersion": ..., "protocols": [...], "pingMs": ..., "remotePeer": ...,
//      "encryption": ..., "multiplexer": ...}
//
// remotePeer is the connection's authenticated peer id. js-libp2p 2.10 does not check
// that it matches the dialed /p2p/ id, so this script does, and fails on a mismatch.
// Exit 0 on success; on any failure (or after TIMEOUT_MS overall) a message on stderr
// and a non-zero exit.

import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

const TIMEOUT_MS = 30_000

function fail (message, code = 1) {
  process.stderr.write(`dial.mjs: ${message}\n`)
  process.exit(code)
}

async function main (target) {
  const addr = multiaddr(target)
  const expectedPeer = addr.getPeerId()
  if (expectedPeer == null) {
    fail(`${target} must end in /p2p/<peer id>`, 2)
  }

  const node = await createLibp2p({
    addresses: { listen: [] }, // a dialer only
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: { identify: identify(), ping: ping() }
  })

  try {
    // Subscribe before dialing: identify runs as soon as the connection opens.
    const identified = new Promise((resolve) => {
      node.addEventListener('peer:identify', (event) => {
        if (event.detail.peerId.toString() === expectedPeer) {
          resolve(event.detail)
        }
      })
    })

    const connection = await node.dial(addr)
    const remotePeer = connection.remotePeer.toString()
    if (remotePeer !== expectedPeer) {
      throw new Error(`dialed ${expectedPeer} but the connection authenticated ${remotePeer}`)
    }

    const result = await identified
    const pingMs = await node.services.ping.ping(connection.remotePeer)

    const line = JSON.stringify({
      agentVersion: result.agentVersion ?? null,
      protocols: [...result.protocols].sort(),
      pingMs,
      remotePeer,
      encryption: connection.encryption ?? null,
      multiplexer: connection.multiplexer ?? null
    })
    // Wait for the write: stdout may be an asynchronous pipe, and we exit right after.
    await new Promise((resolve) => process.stdout.write(line + '\n', resolve))
  } finally {
    await node.stop()
  }
}

if (process.argv.length !== 3) {
  fail('usage: node dial.mjs <multiaddr ending in /p2p/<peer id>>', 2)
}

const timer = setTimeout(() => fail(`no result within ${TIMEOUT_MS / 1000} s`), TIMEOUT_MS)

main(process.argv[2]).then(
  () => {
    clearTimeout(timer)
    process.exit(0)
  },
  (error) => fail(error?.stack ?? String(error))
)
