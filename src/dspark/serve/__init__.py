"""A thin HTTP shell over the engine: an asyncio front (AsyncEngine) driving one decode thread, an
OpenAI-compatible FastAPI app, a uvicorn launcher and a load generator.

Needs the `serve` extra (fastapi, uvicorn, prometheus-client, httpx); nothing here is imported by
the rest of the package.
"""
