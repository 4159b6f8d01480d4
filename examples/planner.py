"""A planner agent: gives the worker a task, follows its progress, and thanks it (see the
README's "Agents in 5 minutes").

    python examples/planner.py RENDEZVOUS_URL WORKER [STATE_DIR]
"""

import asyncio
import sys

import peerpath


async def main(rendezvous: str, worker: str, state_dir: str) -> None:
    async with peerpath.Node.start(state_dir=state_dir, rendezvous=rendezvous) as node:
        task_id = await node.tasks.submit(worker, "summarize", {"text": REPORT}, timeout=60)
        print(f"submitted task {task_id}")
        async for task in node.tasks.updates(task_id):
            print(f"  {task.state.value:<8} {task.progress or 0:.0%} {task.note}")
        print("result:", await node.tasks.result(task_id))
        await node.messages.send(worker, "thanks, that helps", wait=True)
        print("thanked the worker (delivered)")


REPORT = "Revenue grew twelve percent over the quarter while costs stayed flat across regions"

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "planner"))
