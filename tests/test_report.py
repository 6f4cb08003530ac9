"""The run dashboard renders every panel from a run directory's metrics and expert loads."""
import json

import numpy as np

from dsjax import report


def test_report_renders_png_with_expert_heatmaps(tmp_path):
    rows = [{'step': 0, 'val_loss': 8.0, 'maxvio_global': 1.2}]
    rows += [{'step': s, 'loss': 8.0 - s / 10, 'lr': 1e-3, 'grad_norm': 1.0, 'tokens_per_s': 1000.0, 'mfu': 0.3,
              'maxvio_batch': 1.0 / s} for s in range(1, 11)]
    rows += [{'step': 10, 'val_loss': 7.0, 'maxvio_global': 0.2}]
    (tmp_path / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    (tmp_path / 'expert_load').mkdir()
    rng = np.random.default_rng(0)
    for step in (0, 10):
        np.save(tmp_path / 'expert_load' / f'step_{step:08d}.npy', rng.integers(1, 50, size=(3, 8)).astype(float))
    assert [s for s, _ in report.expert_loads(tmp_path)] == [0, 10]
    out = report.render(tmp_path)
    png = out.read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    assert len(png) > 20_000  # nine drawn panels, not an empty canvas
