"""A worker agent: serves the task "summarize" and reports progress (see the README's
"Agents in 5 minutes").

    python examples/worker.py RENDEZVOUS_URL [STATE_DIR]
"""

import asyncio
import sys

import peerpath


async def main(rendezvous: str, state_dir: str) -> None:
    async with peerpath.Node.start(state_dir=state_dir, rendezvous=rendezvous) as node:

        @node.task("summarize", concurrency=2)
        async def summarize(data, task):
            words = data["text"].split()
            task.progress(0.5, f"read {len(words)} words")
            await asyncio.sleep(0.5)  # the real work goes here
            return {"summary": " ".join(words[:5]) + " ...", "words": len(words)}

        print(f"worker {node.address} serves: {', '.join(node.tasks.served)}", flush=True)
        async for message in node.inbox():  # and reads its messages meanwhile
            print(f"message from {message.sender}: {message.data}", flush=True)
            node.messages.ack(message)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "worker"))
