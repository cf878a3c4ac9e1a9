"""How bytes move: the SSE parser, the stream tee, bounded decompression, the Responses
WebSocket mode, and what the bridge needs from mitmproxy's internals (DESIGN.md §2, §11).
Nothing here knows an API beyond what an ``aibridge.apis.Api`` tells it."""
