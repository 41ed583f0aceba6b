"""The delivery check of one viewer on one session: every seq once, in order. Pure, no Locust."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SeqTracker:
    """What one viewer has seen of one session. Seqs must arrive as last+1: a jump ahead is a gap
    (the skipped seqs are `lost` unless they come later, which is then a duplicate), a seq at or
    below the last one is a duplicate. `last=None` takes the first seq seen as the baseline (a
    viewer that joined live, without last_seq)."""

    session_id: str
    last: int | None = 0
    gaps: int = 0
    lost: int = 0
    duplicates: int = 0
    received: int = 0

    def see(self, seq: int) -> str:
        self.received += 1
        if self.last is None or seq == self.last + 1:
            self.last = seq
            return "ok"
        if seq <= self.last:
            self.duplicates += 1
            return "duplicate"
        self.gaps += 1
        self.lost += seq - self.last - 1
        self.last = seq
        return "gap"
