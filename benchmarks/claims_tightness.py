"""Tightness of the declared and certified constants (docs/algebra.md, "Tightness").

For every model of tests/test_adversarial_claims.py, at init and after 50 DualizeRetract steps:
declared sensitivity ν, the adversarial measurement (modula_mhc.claims.measure_sensitivity,
3 restarts × 30 steps), the certified constant at the worst input found, and the same for the
weight gain κ. Prints a Markdown table. About 10 minutes on 2 busy CPU cores.

    python benchmarks/claims_tightness.py [model names...]
"""
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import test_adversarial_claims as T  # noqa: E402  (the models and the training loop of the tests)

from modula_mhc import claims  # noqa: E402


def row(name, net, x, restarts=3, steps=30):
    f, xf = claims.input_part(net, x)
    m = claims.measure_sensitivity(f, xf, restarts=restarts, steps=steps)
    c0, cw = claims.certify(f, xf), claims.certify(f, m.x)
    w = claims.measure_weight_gain(net, x, restarts=2, steps=10)
    cn = claims.certify(net, x)
    nu = c0.claimed["sensitivity"]
    return (f"| {name} | {nu:.3g} | {m.value:.3g} | {m.value / nu:.2f} | {cw.certified['sensitivity']:.3g} | "
            f"{m.value / cw.certified['sensitivity']:.2f} | {'yes' if c0.in_domain else 'no'} | "
            f"{cn.claimed['weight_gain']:.3g} | {w.value:.3g} | {cn.certified['weight_gain']:.3g} |")


def main(names):
    torch.set_num_threads(1)
    print("| model | declared ν | measured | measured/declared | certified at worst x | measured/certified | "
          "start batch in domain | declared κ | measured κ | certified κ |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names or list(T.MODELS):
        for trained in (False, True):
            net, x = T._build(name, trained)
            print(row(name + (" (trained 50 steps)" if trained else ""), net, x), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
