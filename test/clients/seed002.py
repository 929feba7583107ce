# Seed 002's Python client (listen_for_updates), as the seed gives it. Changed only for the URL and
# port, the API key and the job id, which come from the command line.
# Usage: python3 seed002.py <ws base url> <api key> <job id>
import asyncio
import json
import sys

import websockets

BASE_URL, API_KEY, JOB_ID = sys.argv[1:4]
WS_URL = f"{BASE_URL}/api/v1/ws/jobs?api_key={API_KEY}"


async def listen_for_updates(job_id: str):
    """Connect to WebSocket and stream job updates."""
    async with websockets.connect(WS_URL) as ws:
        # Wait for connection confirmation
        msg = json.loads(await ws.recv())
        print(f"Connected: {msg}")

        # Subscribe to job
        await ws.send(json.dumps({
            "action": "subscribe",
            "job_id": job_id
        }))

        # Listen for events
        async for raw in ws:
            event = json.loads(raw)

            if event["type"] == "job_update":
                print(f"Job {event['job_id']}: {event['status']}")

                if event["status"] == "succeeded":
                    print(f"Result: {event['result']}")
                    return event["result"]

                if event["status"] == "failed":
                    raise Exception(f"Job failed: {event['error']}")

            elif event["type"] == "heartbeat":
                pass  # Connection is alive

            elif event["type"] == "error":
                print(f"Error: {event['message']}")

# Usage
result = asyncio.run(listen_for_updates(JOB_ID))
print(f"Returned: {json.dumps(result)}")
