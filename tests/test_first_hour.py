"""What a PyTorch user meets in the first hour (issue 14): clear errors at the boundaries, duals
that do not depend on the gradient's scale, a readable print(model), a light import."""
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch

import modula_mhc as mm
from modula_mhc import atoms, bonds, compounds
from modula_mhc.algebra import Identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_CALLS = {
    # constructors: widths, depths, heads and masses that are not finite positive numbers
    "Linear(inf, 4)": lambda: atoms.Linear(math.inf, 4),
    "Embed(nan, 4)": lambda: atoms.Embed(math.nan, 4),
    "Gain(10**400)": lambda: atoms.Gain(10 ** 400),
    "Conv2d kernel inf": lambda: atoms.Conv2d(1, 1, math.inf),
    "Conv2d stride 0": lambda: atoms.Conv2d(1, 1, 3, stride=0),
    "Conv2d padding -1": lambda: atoms.Conv2d(1, 1, 3, padding=-1),
    "SplitHeads(inf)": lambda: bonds.SplitHeads(math.inf),
    "GPT width inf": lambda: compounds.GPT(11, 8, math.inf, 2, 2),
    "GPT depth inf": lambda: compounds.GPT(11, 8, 8, math.inf, 2),
    "GPT heads inf": lambda: compounds.GPT(11, 8, 8, 2, math.inf),
    "GPT mlp_ratio inf": lambda: compounds.GPT(11, 8, 8, 2, 2, mlp_ratio=math.inf),
    "GPT streams inf": lambda: compounds.GPT(11, 8, 8, 2, 2, residual="mhc", streams=math.inf),
    "GPT blocks_mass nan": lambda: compounds.GPT(11, 8, 8, 2, 2, blocks_mass=math.nan),
    "MLP depth inf": lambda: compounds.MLP(4, 2, width=8, depth=math.inf),
    "M ** inf": lambda: atoms.Linear(4, 4) ** math.inf,
    "residual depth nan": lambda: mm.residual(atoms.Linear(4, 4), math.nan),
    "residual depth 10**400": lambda: mm.residual(atoms.Linear(4, 4), 10 ** 400),
    "inf * M": lambda: math.inf * atoms.Linear(4, 4),
    # beyond float32's reach once norms scale by |a| and dual targets by 1/|a| (before: inf norms,
    # a LinAlgError, non-finite weights after one step)
    "1e40 * M": lambda: 1e40 * atoms.Linear(4, 4),
    "1e-40 * M": lambda: 1e-40 * atoms.Linear(4, 4),
    "M / 0": lambda: atoms.Linear(4, 4) / 0,
    # calls with something that is not a suitable tensor
    "GPT(list)": lambda: compounds.GPT(11, 8, 8, 1, 2)([1, 2, 3]),
    "GPT(0-dim)": lambda: compounds.GPT(11, 8, 8, 1, 2)(torch.tensor(3)),
    "GPT(token >= vocab)": lambda: compounds.GPT(11, 8, 8, 1, 2)(torch.full((2, 4), 11)),
    "Embed(-1)": lambda: atoms.Embed(11, 8)(torch.tensor([-1])),
    "Linear(0-dim)": lambda: atoms.Linear(4, 3)(torch.tensor(1.0)),
    "Linear(None)": lambda: atoms.Linear(4, 3)(None),
    "Gain wrong width": lambda: atoms.Gain(4)(torch.zeros(2, 3)),
    "Mean(1-dim)": lambda: bonds.Mean()(torch.zeros(3)),
    "Flatten(0-dim)": lambda: bonds.Flatten()(torch.tensor(1.0)),
    "RMSNorm(None)": lambda: bonds.RMSNorm()(None),
    "MergeHeads(None)": lambda: bonds.MergeHeads()(None),
    "Add(tensor)": lambda: bonds.Add()(torch.zeros(3)),
    "norm([1.0])": lambda: atoms.Linear(4, 3).norm([1.0]),
    "dualize target nan": lambda: atoms.Linear(4, 3).dualize([torch.ones(3, 4)], target_norm=math.nan),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_value_or_type_error(name):
    """Only ValueError/TypeError (no OverflowError, ZeroDivisionError, AttributeError, IndexError),
    with a one-line message."""
    with pytest.raises((ValueError, TypeError)) as info:
        BAD_CALLS[name]()
    assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize("mass", [math.nan, math.inf, -math.inf, -1.0, 10 ** 400, "1"])
def test_atom_mass_must_be_a_finite_non_negative_number(mass):
    with pytest.raises(ValueError, match="mass must be a finite number"):
        atoms.Linear(4, 4, mass=mass)
    atom = atoms.Bias(4)
    with pytest.raises(ValueError, match="mass must be a finite number"):
        atom.mass = mass
    assert atom.mass == 1.0


@pytest.mark.parametrize("make", [lambda: atoms.Bias(6), lambda: atoms.Embed(5, 6), lambda: atoms.Gain(6),
                                  lambda: atoms.Linear(6, 4)], ids=["Bias", "Embed", "Gain", "Linear"])
def test_duals_do_not_depend_on_the_gradient_scale(make):
    """The dual of s·G is the dual of G for s from 1e-30 to 1e30 (float32 squares of such entries
    under- or overflow unless G is rescaled first)."""
    atom = make()
    G = torch.randn(atom.weight.shape, generator=torch.Generator().manual_seed(0))
    G[0] = 0.0  # a zero row stays zero (Embed) and changes nothing elsewhere
    reference = atom.dualize_weight(G, 1.0)
    assert float(atom.weight_norm(reference)) == pytest.approx(1.0, rel=1e-2)
    for exponent in range(-30, 31, 5):
        scaled = atom.dualize_weight(G * 10.0 ** exponent, 1.0)
        assert torch.allclose(scaled, reference, rtol=1e-4, atol=1e-6), exponent


def test_add_refuses_mismatched_widths():
    """Known widths: refused when composed. Widths not known then (a branch of Identity/ReLU inside
    a sub-tree built before its width was): refused when run, never broadcast."""
    with pytest.raises(ValueError, match="widths"):
        bonds.Add() @ (atoms.Linear(3, 2), atoms.Linear(3, 4))
    net = bonds.Add() @ (bonds.Add() @ (Identity(), bonds.ReLU()), atoms.Linear(8, 1))
    with pytest.raises(ValueError, match="different shapes"):
        net(torch.randn(5, 8))
    same = bonds.Add() @ (bonds.Add() @ (Identity(), bonds.ReLU()), atoms.Linear(8, 8))
    assert same(torch.randn(5, 8)).shape == (5, 8)


def test_gpt_zero_dim_input_gets_its_own_error():
    with pytest.raises(ValueError, match=r"GPT\(context=8\) expects a tensor with at least 1 dimension"):
        compounds.GPT(11, 8, 8, 1, 2)(torch.tensor(3))


def test_norm_of_a_symbolic_module_is_refused():
    sympy = pytest.importorskip("sympy")
    d = sympy.Symbol("d", positive=True, integer=True)
    with pytest.raises(ValueError, match="symbolic dimensions"):
        atoms.Linear(d, 3).norm()
    assert float(mm.symbolic.describe(atoms.Linear(d, 3))["mass"]) == 1.0


def test_sparse_gradient_reaches_its_dedicated_error():
    """A sparse gradient (nn.Embedding(sparse=True) style) gets the optimizer's TypeError naming
    sparse gradients, not an error from the finite check that runs torch.isfinite on it."""
    net = atoms.Embed(10, 4)
    opt = mm.optim.DualizeRetract(net, lr=0.1)
    net.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 4), (10, 4),
                                                check_invariants=True)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_print_of_a_gpt_is_compact():
    """Containers are spliced into their parents and numbers rounded: a 2-block GPT fits on a
    screen (it took 62 lines up to 111 characters wide)."""
    text = repr(compounds.GPT(65, 64, 64, 2, 4))
    lines = text.splitlines()
    assert len(lines) <= 35 and max(map(len, lines)) <= 80, text
    assert "ModuleList" not in text and "0.4166666" not in text
    assert "Linear(64, 256, mass=0.4167, role=mlp_in)" in text  # constructor order: in, out
    assert "(1-2): 2 x Block(" in text and "0.25 × Compose(" in text


def test_import_does_not_load_sympy():
    """sympy (~0.4 s to import) loads only with modula_mhc.symbolic or a symbolic dimension; building
    an optimizer does not import torch._dynamo (~3 s: torch's add_param_group imported it) and an
    mHC layer does not import transformers (~2 s: only to recognise its Conv1D)."""
    code = ("import sys, modula_mhc as mm; assert 'sympy' not in sys.modules, 'sympy imported';"
            "gpt = mm.compounds.GPT(11, 8, 8, 2, 2); assert 'sympy' not in sys.modules, 'sympy by GPT';"
            "mm.optim.DualizeRetract(gpt); assert 'torch._dynamo' not in sys.modules, 'dynamo by the optimizer';"
            "from modula_mhc.compounds.hyper import HyperConnections;"
            "import torch; HyperConnections(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)), streams=2, width=8);"
            "assert 'transformers' not in sys.modules, 'transformers by HyperConnections';"
            "mm.symbolic; assert 'sympy' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------- docs and setup
def _read(relative):
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return f.read()


def test_one_learning_rate_in_defaults_and_docs():
    """The optimizer's, the distributed optimizer's and the CLI's default lr, every DualizeRetract
    snippet in the README and the docs, and the measured best of docs/results.md are one number."""
    import inspect
    import re

    from modula_mhc.config import DEFAULT_LR
    from modula_mhc.distributed import DistributedDualizeRetract

    default = inspect.signature(mm.optim.DualizeRetract).parameters["lr"].default
    assert DEFAULT_LR["dualize"] == default
    assert inspect.signature(DistributedDualizeRetract).parameters["lr"].default == default
    snippet = re.compile(r"DualizeRetract\((?:gpt|net|model)\b[^)\n]*\blr=([0-9.]+)")
    for doc in ("README.md", "docs/index.md", "docs/optimizer.md"):
        found = [float(v) for v in snippet.findall(_read(doc))]
        assert found and set(found) == {default}, (doc, found)
    assert f"The default learning rate is **{default:g}**" in _read("README.md")
    assert re.search(rf"\| `--lr` \| dualize {default:g}, ", _read("docs/training.md"))
    results = _read("docs/results.md")
    for sweep in (r"GPT width 16/32/64/128 → ([0-9.]+) at every width", r"GPT depth 2/4/8/16 → ([0-9.]+) at every depth"):
        assert float(re.search(sweep, results).group(1)) == default, sweep


def test_api_reference_is_current(capsys):
    """docs/api.md is what docs/build_api.py renders now (run `make docs` after changing a docstring)."""
    # the script's own --check, in this process: a fresh interpreter only added ~3 s of imports
    build = runpy.run_path(os.path.join(ROOT, "docs", "build_api.py"))
    assert build["main"](["--check"]) == 0, capsys.readouterr().err


def test_user_docs_have_no_internal_wording():
    """Issue numbers, the internal design card and the development data path stay in
    docs/decisions.md (the project's history), out of the pages a user reads."""
    import glob
    import re

    internal = re.compile(r"\b[Ii]ssues? \d+|\bDESIGN\b|shared/data|\bsessions?\b")
    pages = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    hits = [(page, m.group(0)) for page in pages if not page.endswith("decisions.md")
            for m in internal.finditer(_read(page))]
    assert not hits, hits


def test_readme_has_plain_pip_install_and_a_cpu_only_line():
    readme = _read("README.md")
    assert "pip install .  " in readme and 'pip install ".[examples]"' in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "make test" in readme and "make demo" in readme
    setup = _read("setup.cfg")
    assert "numpy" not in setup and "mkdocs" not in setup  # never imported / no docs site


def test_examples_write_to_an_ignored_folder_by_default():
    """Running an example never rewrites tracked files: --out defaults under runs/ (git-ignored);
    docs/figures is written only when named explicitly."""
    import ast
    import glob
    import importlib.util

    for path in glob.glob(os.path.join(ROOT, "examples", "*.py")):
        tree = ast.parse(_read(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--out":
                default = next((ast.get_source_segment(_read(path), k.value) for k in node.keywords if k.arg == "default"), "")
                assert "FIGURES" not in default and "docs" not in default, (path, default)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        for name in ("lr_transfer", "manifold_study", "mhc_study"):
            spec = importlib.util.spec_from_file_location(f"first_hour_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            out = os.path.abspath(module.parse_args([]).out)
            assert out.startswith(os.path.join(ROOT, "runs") + os.sep), (name, out)
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/examples/lr_transfer_gpt_width.png"], cwd=ROOT)
    assert ignored.returncode == 0, "runs/ must be git-ignored"


def test_missing_examples_extra_is_named_once(monkeypatch, capsys, tmp_path):
    """Without tqdm and matplotlib a run says once what it lacks and which extra brings them."""
    from modula_mhc import outputs

    monkeypatch.setitem(sys.modules, "tqdm", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(outputs, "_noted_missing", [False])
    outputs.Progress(quiet=True).start(10, 0)
    assert capsys.readouterr().err == ""  # --quiet prints nothing
    for _ in range(2):
        outputs.Progress(quiet=False).start(10, 0)
    err = capsys.readouterr().err
    assert err.count("pip install 'modula_mhc[examples]'") == 1, err
    assert "tqdm is not installed: no progress bar" in err and "matplotlib is not installed: no loss.png" in err
    assert outputs.plot_losses(tmp_path / "loss.png", {"step": [], "train_loss": [], "eval": []}, "t") is False
