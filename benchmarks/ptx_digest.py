"""A digest of the instructions in a PTX listing, blind to register numbers and to their order.

Two builds of a kernel with equal digests run the same instructions, the same number of times per
listing: a refactor of kernel source that keeps the digest (`--opcodes` of the *_ptxas.py scripts,
run on two checkouts) changes no work, only names and the order ptxas schedules anyway.
"""

import collections
import hashlib
import re

_INSTRUCTION = re.compile(r"(@!?%\w+\s+)?([a-z][\w.:]*)")


def opcode_counts(ptx: str) -> collections.Counter:
    """Instruction name (with its type suffixes) -> count, over the code of a PTX listing."""
    if ".section\t.debug" in ptx:
        ptx = ptx[: ptx.index(".section\t.debug")]
    counts = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        match = _INSTRUCTION.match(line)
        if match and not line.startswith("."):
            counts[match.group(2)] += 1
    return counts


def opcode_digest(ptx: str) -> str:
    """12 hex digits of sha1 over the sorted opcode counts."""
    text = "\n".join(f"{name} {n}" for name, n in sorted(opcode_counts(ptx).items()))
    return hashlib.sha1(text.encode()).hexdigest()[:12]
