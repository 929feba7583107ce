'use strict'
// Seed 001's complete example client, run with the `ws` package as WebSocket. Changed for the base
// URL, the run id and the session cookie header (from the command line), the class name, and the
// usage's DOM and alert calls, which print instead.
// Usage: node seed001.js <http base url> <run uuid> <cookie>
const WebSocket = require('ws')
const [baseUrlArg, runUuidArg, cookie] = process.argv.slice(2)

class ScanWebSocket {
  constructor (baseUrl, runUUID) {
    this.baseUrl = baseUrl
    this.runUUID = runUUID
    this.ws = null
  }

  connect () {
    const wsUrl = this.baseUrl.replace(/^http/, 'ws') + '/ws'
    this.ws = new WebSocket(wsUrl, { headers: { Cookie: cookie } })

    this.ws.onopen = () => {
      console.log('Connected to WebSocket')
      this.subscribe()
    }

    this.ws.onmessage = (event) => {
      this.handleMessage(event)
    }

    this.ws.onerror = (error) => {
      console.error('WebSocket error:', error)
    }

    this.ws.onclose = (event) => {
      if (event.wasClean) {
        console.log('Connection closed cleanly:', event.code)
      } else {
        console.log('Connection closed unexpectedly:', event.code)
      }
    }
  }

  subscribe () {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      const message = {
        type: 'subscribe',
        run_uuid: this.runUUID
      }
      this.ws.send(JSON.stringify(message))
    }
  }

  handleMessage (event) {
    try {
      const message = JSON.parse(event.data)

      switch (message.type) {
        case 'subscribed':
          console.log('Subscribed to scan:', this.runUUID)
          this.onSubscribed(message.data)
          break

        case 'status_update':
          console.log('Status update:', JSON.stringify(message.data))
          this.onStatusUpdate(message.data)
          break

        case 'unsubscribed':
          console.log('Unsubscribed from scan')
          this.onUnsubscribed(message.data)
          break
      }
    } catch (error) {
      console.error('Failed to parse message:', error)
    }
  }

  // Override these methods in your implementation
  onSubscribed (data) {
    console.log('Successfully subscribed:', JSON.stringify(data))
  }

  onStatusUpdate (data) {
    console.log('Progress:', data.progression + '%')

    if (data.status === 'optimal') {
      console.log('Scan completed!')
      // Server will disconnect automatically
    }
  }

  onUnsubscribed (data) {
    console.log('Unsubscribed:', JSON.stringify(data))
  }

  unsubscribe () {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      const message = {
        type: 'unsubscribe',
        run_uuid: this.runUUID
      }
      this.ws.send(JSON.stringify(message))
    }
  }

  disconnect () {
    if (this.ws) {
      this.unsubscribe()
      this.ws.close()
    }
  }
}

// Usage
const socket = new ScanWebSocket(baseUrlArg, runUuidArg)

// Override handlers
socket.onStatusUpdate = (data) => {
  console.log('Progress:', data.progression + '%')

  if (data.status === 'optimal') {
    console.log('Scan completed!')
  }
}

// Connect
socket.connect()
