'use strict'
// Seed 000's JavaScript client, as the seed gives it, run with the `ws` package as WebSocket.
// Changed only for the job id, the URL and port, and the session cookie header (the socket is
// only for the session that uploaded).
// Usage: node seed000.js <ws base url> <job id> <cookie>
const WebSocket = require('ws')
const [baseUrl, jobIdArg, cookie] = process.argv.slice(2)

const jobId = jobIdArg
const ws = new WebSocket(`${baseUrl}/ws/batch/${jobId}`, { headers: { Cookie: cookie } })

ws.onopen = () => {
  console.log('WebSocket connected')
}

ws.onmessage = (event) => {
  const data = JSON.parse(event.data)
  console.log(`Progress: ${data.progress}% (${data.processed}/${data.total})`)
  console.log(`ETA: ${data.eta_seconds} seconds`)

  if (data.status === 'complete') {
    console.log('Job complete!')
    ws.close()
  } else if (data.status === 'failed') {
    console.error('Job failed')
    ws.close()
  }
}

ws.onerror = (error) => {
  console.error('WebSocket error:', error)
}

ws.onclose = () => {
  console.log('WebSocket closed')
}

// Send keep-alive pings every 30 seconds
const keepAlive = setInterval(() => {
  if (ws.readyState === WebSocket.OPEN) {
    ws.send('ping')
  }
}, 30000)

// Clean up on close
ws.addEventListener('close', () => {
  clearInterval(keepAlive)
})
