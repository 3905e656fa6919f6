"""Run `trunkline serve` with an app that raises on the second call it gets.

Used by test_faults.py to show that one call's failure ends only that call.
The fake sits at the app boundary; SIP, media and the cell are real.
"""
import sys

from bridge import cli
from bridge.cell import apps

_made = []
_real = apps.make_app


class Exploding(apps.EchoApp):
    def on_frames(self, frames, now):
        if self.session.media.rx_timer.count > 50:
            raise RuntimeError("simulated application bug")
        super().on_frames(frames, now)


def make_app(name, session, cell):
    _made.append(session.call_id)
    if len(_made) == 2:
        return Exploding(session)
    return _real(name, session, cell)


if __name__ == "__main__":
    import bridge.cell.cell
    bridge.cell.cell.make_app = make_app
    sys.exit(cli.main(sys.argv[1:]))
