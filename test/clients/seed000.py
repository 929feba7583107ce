# Seed 000's Python client (monitor_batch), as the seed gives it. Changed only for the job id, the
# URL and port, and the session cookie header (the socket is only for the session that uploaded).
# Usage: python3 seed000.py <ws base url> <job id> <cookie>
import asyncio
import inspect
import sys

import websockets
import json

BASE_URL, JOB_ID, COOKIE = sys.argv[1:4]


def cookie_header():
    # websockets >= 14 names the option additional_headers; older releases extra_headers.
    params = inspect.signature(websockets.connect).parameters
    name = 'additional_headers' if 'additional_headers' in params else 'extra_headers'
    return {name: {'Cookie': COOKIE}}


async def monitor_batch(job_id):
    uri = f"{BASE_URL}/ws/batch/{job_id}"

    async with websockets.connect(uri, **cookie_header()) as websocket:
        print("Connected to WebSocket")

        # Send keep-alive pings
        async def keep_alive():
            while True:
                await asyncio.sleep(30)
                await websocket.send("ping")

        # Start keep-alive task
        ping_task = asyncio.create_task(keep_alive())

        try:
            async for message in websocket:
                data = json.loads(message)
                print(f"Progress: {data['progress']}% ({data['processed']}/{data['total']})")
                print(f"ETA: {data['eta_seconds']} seconds")

                if data['status'] in ['complete', 'failed', 'cancelled']:
                    print(f"Job {data['status']}")
                    break
        finally:
            ping_task.cancel()

# Run
asyncio.run(monitor_batch(JOB_ID))
