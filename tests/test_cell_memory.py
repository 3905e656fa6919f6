"""What a cell keeps per call must be bounded: a cell runs for weeks."""
from media.quality import Quality
from sip import events as ev


def test_a_cell_keeps_only_the_last_ended_calls(tmp_path):
    """The cell kept every CallEnded (with its Quality and timing) in a list for its whole life:
    about 1 KB a call that a long soak showed as steady growth. Only the last ENDED_KEPT stay."""
    from bridge.cell import cell as cell_mod
    from bridge.core.config import load
    p = tmp_path / "c.toml"
    p.write_text(f'data_dir = "{tmp_path}/data"\n[models]\nload = "never"\n')
    c = cell_mod.Cell(load(str(p)))
    n = 3 * cell_mod.ENDED_KEPT
    for i in range(n):
        c._ev_CallEnded(ev.CallEnded(f"call-{i}", "inbound", 200, "remote bye", True, 1.0, Quality(), None))
    assert len(c.ended) == cell_mod.ENDED_KEPT
    assert c.ended[-1].call_id == f"call-{n - 1}"                  # the newest are the ones kept
    assert c.metrics.calls_total.labels("inbound", "answered")._value.get() == n   # each was handled
