"""What the demo shows while it runs: one live panel per row (a terminal) or a plain log (a pipe)."""

from __future__ import annotations

from blora.demo.streams import Row

REASONS = {"stop": "stop (EOS)", "length": "length (max tokens)"}


def status(row: Row) -> str:
    """A row's state in a few words: tokens so far, or how and when it ended."""
    n = len(row.token_ids)
    if row.finish_reason is None:  # not done
        return f"{n} tokens..."
    reason = REASONS.get(row.finish_reason, row.finish_reason)
    return f"{reason}, {n} tokens, {row.finished_s:.2f} s"


class LiveView:
    """One rich panel per row, redrawn as tokens arrive; a row's border turns green when it ends."""

    def __init__(self, rows: list[Row], console) -> None:
        from rich.live import Live

        self.rows, self.console = rows, console
        self.live = Live(self._render(), console=console, refresh_per_second=12, transient=False)

    def _render(self):
        from rich.columns import Columns
        from rich.panel import Panel
        from rich.text import Text

        width = max(28, self.console.width // 3 - 2)
        return Columns(
            [
                Panel(
                    Text(r.text or "..."),
                    title=Text(r.label),
                    subtitle=status(r),
                    width=width,
                    border_style="green" if r.done else "cyan",
                )
                for r in self.rows
            ]
        )

    def update(self) -> None:
        self.live.update(self._render())

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.update(self._render(), refresh=True)
        self.live.__exit__(*exc)


class PlainLog:
    """A line when a row ends (so a log shows rows ending on their own), every answer at the end."""

    def __init__(self, rows: list[Row], console) -> None:
        self.rows, self.console = rows, console
        self._reported: set[int] = set()

    def update(self) -> None:
        for i, row in enumerate(self.rows):
            if row.done and i not in self._reported:
                self._reported.add(i)
                line = f"[{row.label}] ended: {status(row)}"
                self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def __enter__(self) -> PlainLog:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        from rich.text import Text

        for row in self.rows:
            self.console.print(Text.assemble("\n", (row.label, "bold"), f" ({status(row)})"), soft_wrap=True)
            self.console.print(row.text, highlight=False, markup=False)
