"""What releasing the default run at several ε together costs, from the plans alone (no training).

The default dpdm run (N = 4000, expected batch 256, 200 DP steps) is planned at ε = 1, 4 and 10;
every planned step is recorded, as a finished run records them, and the ledgers are composed as
``python -m dpgen.compose`` composes finished runs. ``.venv/bin/python scripts/composition_example.py``
"""

from dpgen.privacy.composition import combine
from dpgen.privacy.events import POISSON_GAUSSIAN
from dpgen.privacy.ledger import PlannedStage, PrivacyLedger

N, BATCH, STEPS, DELTA = 4000, 256, 200, 1e-5

ledgers = {}
for eps in (1.0, 4.0, 10.0):
    ledger = PrivacyLedger(eps, DELTA, N)
    (stage,) = ledger.plan([PlannedStage("dp_train", POISSON_GAUSSIAN, BATCH / N, count=STEPS)])
    ledger.record("dp_train", POISSON_GAUSSIAN, stage.noise_multiplier, stage.sample_rate, count=STEPS)
    ledgers[eps] = ledger.to_json()
    print(f"ε={eps:g} alone: σ={stage.noise_multiplier:.3f}, ε spent {ledger.epsilon_spent():.4g}")
for release in ((1.0, 4.0, 10.0), (1.0, 4.0), (10.0, 10.0)):
    c = combine({f"run {i} (ε={eps:g})": ledgers[eps] for i, eps in enumerate(release)})
    print(f"{' + '.join(f'ε={e:g}' for e in release)}: composed ε={c.epsilon:.4g} at δ={c.delta:g}; "
          f"summed ε={c.epsilon_sum:.4g} at δ={c.delta_sum:g}")
