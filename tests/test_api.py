"""The library API: selection, grouping, sorting, shares and the clip coefficient."""

from __future__ import annotations

import inspect as pyinspect
import math
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect
from gradinspect.clip import clip_coef
from gradinspect.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def _g() -> dict[str, np.ndarray]:
    return {
        "model.layers.0.attn.weight": np.full(4, 1.0),  # sq 4
        "model.layers.0.mlp.weight": np.full(9, 2.0),  # sq 36
        "model.layers.1.attn.weight": np.full(1, 3.0),  # sq 9
        "model.layers.1.mlp.weight": np.zeros(5),  # sq 0: dead
        "lm_head.weight": np.full(2, -1.5),  # sq 4.5
    }


def test_totals_and_shares() -> None:
    r = gradinspect.compute_norms(_g())
    assert r.total.sq == 53.5
    assert r.total.l2 == math.sqrt(53.5)
    assert r.total.l1 == 4 + 18 + 3 + 0 + 3
    assert r.total.linf == 3.0
    assert r.total.numel == 21 and r.total.tensors == 5
    shares = {t.name: t.share for t in r.tensors}
    assert shares["model.layers.0.mlp.weight"] == 36 / 53.5
    assert math.fsum(shares.values()) == pytest.approx(1.0, abs=1e-15)
    assert [t.name for t in r.tensors][:2] == ["model.layers.0.mlp.weight", "model.layers.1.attn.weight"]


def test_share_is_zero_everywhere_when_the_norm_is_zero() -> None:
    r = gradinspect.compute_norms({"a": np.zeros(3), "b": np.zeros(2)})
    assert [t.share for t in r.tensors] == [0.0, 0.0]
    assert r.clip.coef == 1.0 and not r.clip.clipped


def test_share_with_nonfinite_tensors() -> None:
    r = gradinspect.compute_norms({"bad": np.array([np.nan, 1.0]), "a": np.array([3.0]), "b": np.array([4.0])})
    shares = {t.name: t.share for t in r.tensors}
    assert math.isnan(shares["bad"])
    assert shares["a"] == 9 / 25 and shares["b"] == 16 / 25
    assert r.tensors[0].name == "bad"  # NaN sorts first: it is what the user looks for
    assert math.isnan(r.total.l2) and math.isnan(r.clip.coef) and not r.clip.clipped
    assert any("NaN" in w for w in r.warnings())


def test_include_exclude() -> None:
    r = gradinspect.compute_norms(_g(), include=["model.*"], exclude=["*.mlp.*"])
    assert sorted(t.name for t in r.tensors) == ["model.layers.0.attn.weight", "model.layers.1.attn.weight"]
    assert r.total.sq == 13.0
    r = gradinspect.compute_norms(_g(), include=["lm_head.*", "*.1.attn.*"])
    assert r.total.tensors == 2


def test_group_by_merges_exactly() -> None:
    r = gradinspect.compute_norms(_g(), group_by=3, sort="name")
    rows = {t.name: t for t in r.tensors}
    assert list(rows) == ["lm_head.weight", "model.layers.0", "model.layers.1"]
    assert rows["model.layers.0"].sq == 40.0 and rows["model.layers.0"].members == 2
    assert rows["model.layers.0"].shape is None and rows["model.layers.0"].numel == 13
    assert rows["lm_head.weight"].shape == (2,) and rows["lm_head.weight"].members == 1
    assert r.total.sq == 53.5 and r.total.tensors == 5


@pytest.mark.parametrize(
    "key,expected",
    [
        ("share", ["model.layers.0.mlp.weight", "model.layers.1.attn.weight", "lm_head.weight",
                   "model.layers.0.attn.weight", "model.layers.1.mlp.weight"]),
        ("norm", ["model.layers.0.mlp.weight", "model.layers.1.attn.weight", "lm_head.weight",
                  "model.layers.0.attn.weight", "model.layers.1.mlp.weight"]),
        ("name", sorted(_g())),
        ("numel", ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.layers.0.attn.weight",
                   "lm_head.weight", "model.layers.1.attn.weight"]),
        ("none", list(_g())),
    ],
)
def test_sort(key: str, expected: list[str]) -> None:
    assert [t.name for t in gradinspect.compute_norms(_g(), sort=key).tensors] == expected


def test_sort_by_norm_follows_norm_type() -> None:
    g = {"spiky": np.array([10.0, 0, 0, 0]), "flat": np.full(100, 1.5)}
    assert [t.name for t in gradinspect.compute_norms(g, sort="norm", norm_type="inf").tensors] == ["spiky", "flat"]
    assert [t.name for t in gradinspect.compute_norms(g, sort="norm", norm_type=1).tensors] == ["flat", "spiky"]


def test_top_keeps_totals() -> None:
    r = gradinspect.compute_norms(_g(), top=2)
    assert len(r.tensors) == 2 and r.omitted == 3
    assert r.total.tensors == 5 and r.total.sq == 53.5


def test_norm_types() -> None:
    g = {"a": np.array([3.0, -4.0]), "b": np.array([12.0])}
    assert gradinspect.compute_norms(g, norm_type=1).total.norm == 19.0
    assert gradinspect.compute_norms(g, norm_type="inf").total.norm == 12.0
    assert gradinspect.compute_norms(g, norm_type=2).total.norm == 13.0
    assert gradinspect.compute_norms(g, norm_type=3).total.norm == pytest.approx((27 + 64 + 1728) ** (1 / 3), rel=1e-15)


def test_clip_uses_the_selected_norm() -> None:
    g = {"a": np.array([3.0, -4.0])}
    r = gradinspect.compute_norms(g, norm_type=1, max_norm=1.0, eps=0.0)
    assert r.clip.coef == 1 / 7 and r.clip.clipped
    assert r.clip.norm_after == 7 * (1 / 7)


@pytest.mark.parametrize(
    "total,max_norm,eps,expected",
    [
        (5.0, 1.0, 1e-6, 1.0 / (5.0 + 1e-6)),  # torch: max_norm / (total + eps)
        (0.5, 1.0, 1e-6, 1.0),  # never above 1
        (1.0, 1.0, 1e-6, 1.0 / (1.0 + 1e-6)),  # torch clips (slightly) even at the threshold
        (1.0, 1.0, 0.0, 1.0),  # optax: max_norm / max(total, max_norm)
        (4.0, 2.0, 0.0, 0.5),
        (0.0, 1.0, 0.0, 1.0),
        (0.0, 1.0, 1e-6, 1.0),
        (math.inf, 1.0, 1e-6, 0.0),
        (math.inf, 1.0, 0.0, 0.0),
    ],
)
def test_clip_coef(total: float, max_norm: float, eps: float, expected: float) -> None:
    assert clip_coef(total, max_norm, eps) == expected


def test_group_by_separator_for_jax_names() -> None:
    g = {"params/dense_0/kernel": np.full(4, 1.0), "params/dense_0/bias": np.full(1, 2.0),
         "params/dense_1/kernel": np.full(9, 1.0)}
    r = gradinspect.compute_norms(g, group_by=2, group_sep="/", sort="name")
    rows = {t.name: (t.sq, t.members) for t in r.tensors}
    assert rows == {"params/dense_0": (8.0, 2), "params/dense_1": (9.0, 1)}
    assert r.to_dict()["group_sep"] == "/" and r.to_dict()["group_by"] == 2
    # Split on "." these names are one part each: every tensor is a group of its own.
    assert gradinspect.compute_norms(g, group_by=2).total.tensors == 3
    assert len(gradinspect.compute_norms(g, group_by=2).tensors) == 3


def test_group_by_regex() -> None:
    # A capturing group names the group; a name it does not match is a row of its own.
    r = gradinspect.compute_norms(_g(), group_by=r"\.(attn|mlp)\.", sort="name")
    rows = {t.name: (t.sq, t.members) for t in r.tensors}
    assert rows == {"attn": (13.0, 2), "mlp": (36.0, 2), "lm_head.weight": (4.5, 1)}
    assert r.total.sq == 53.5 and r.to_dict()["group_by"] == r"\.(attn|mlp)\."
    # Several capturing groups are joined by the separator; without one, the whole match.
    r = gradinspect.compute_norms(_g(), group_by=r"layers\.(\d+)\.(attn|mlp)", group_sep="/", sort="name")
    assert [t.name for t in r.tensors] == ["0/attn", "0/mlp", "1/attn", "1/mlp", "lm_head.weight"]
    r = gradinspect.compute_norms(_g(), group_by=r"layers\.\d+", sort="name")
    assert {t.name: t.members for t in r.tensors} == {"layers.0": 2, "layers.1": 2, "lm_head.weight": 1}


def test_group_by_rejects_bad_values() -> None:
    for bad, match in ((0, "group_by must be"), (True, "group_by must be"), ("(", "not a valid regular expression"),
                       ("", "group_by must be")):
        with pytest.raises(ValueError, match=match):
            gradinspect.compute_norms(_g(), group_by=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_sep must be"):
        gradinspect.compute_norms(_g(), group_by=2, group_sep="")


def test_clip_coef_nan() -> None:
    assert math.isnan(clip_coef(math.nan, 1.0))
    assert math.isnan(clip_coef(math.nan, 1.0, 0.0))


def test_bad_options() -> None:
    for kwargs, message in (
        ({"max_norm": 0.0}, r"max_norm must be a finite number > 0, not 0\.0"),
        ({"eps": -1.0}, r"eps must be a finite number >= 0, not -1\.0"),
        ({"sort": "size"}, r"sort must be one of share, .*, not 'size'"),
        ({"top": -1}, "top must be a whole number >= 0, not -1"),
        ({"group_by": 0}, "group_by must be an integer >= 1 or a regular expression, not 0"),
        ({"norm_type": 0}, "norm type must be 1, 2, inf or a number > 0, not 0"),
    ):
        with pytest.raises(ValueError, match=message):
            gradinspect.compute_norms(_g(), **kwargs)  # type: ignore[arg-type]


def test_in_memory_inputs_of_many_kinds() -> None:
    import ml_dtypes

    r = gradinspect.compute_norms({
        "list": [[3.0, 4.0]],
        "f16": np.array([1.0], np.float16),
        "bf16": np.array([2.0], ml_dtypes.bfloat16),
        "be": np.array([2.0], ">f8"),
        "count": np.array([7]),
    })
    assert r.total.sq == 25 + 1 + 4 + 4
    assert [s.name for s in r.skipped] == ["count"]


def test_report_to_dict_shape() -> None:
    d = gradinspect.compute_norms(_g()).to_dict()
    assert d["schema"] == "gradinspect.norms/1"
    assert set(d) >= {"schema", "sources", "norm_type", "tensors", "skipped", "total", "clip"}
    assert set(d["tensors"][0]) >= {"name", "source", "shape", "dtype", "numel", "l1", "l2", "linf", "norm", "sq",
                                    "share", "nonfinite"}
    assert set(d["total"]) >= {"tensors", "numel", "l1", "l2", "linf", "norm", "sq", "nonfinite"}
    assert set(d["clip"]) == {"max_norm", "eps", "coef", "clipped", "norm_after"}
    assert d["norm_type"] == 2


def test_info_report_has_the_total_its_json_has(tmp_path: Path) -> None:
    from gradinspect.api import info

    path = tmp_path / "g.safetensors"
    save_file({"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float16), "step": np.array(1, np.int64)}, str(path))
    r = info(path)
    assert (r.total.tensors, r.total.numel, r.total.bytes) == (3, 11, 24 + 8 + 8)
    assert r.total.by_dtype["float32"] == {"tensors": 1, "numel": 6, "bytes": 24}
    assert r.to_dict()["total"] == r.total.to_dict()


def test_compute_norms_takes_any_mapping_or_pairs() -> None:
    expected = gradinspect.compute_norms(_g()).to_dict()
    assert gradinspect.compute_norms(MappingProxyType(_g())).to_dict() == expected
    assert gradinspect.compute_norms(list(_g().items())).to_dict() == expected
    assert gradinspect.compute_norms((name, a) for name, a in _g().items()).to_dict() == expected
    with pytest.raises(ValueError, match="tensor name 'w' appears twice"):
        gradinspect.compute_norms([("w", np.ones(2)), ("v", np.ones(2)), ("w", np.ones(3))])
    with pytest.raises(ValueError, match=r"expected \(name, array\) pairs, got int"):
        gradinspect.compute_norms([1, 2])  # type: ignore[list-item]


def test_repeated_names_error_names_the_python_keyword(tmp_path: Path) -> None:
    for n in ("a", "b"):
        save_file({"w": np.ones(2)}, str(tmp_path / f"{n}.safetensors"))
    with pytest.raises(InputError, match=r"--shards slices or --shards replicas \(shards= in Python\)"):
        gradinspect.inspect([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


def _readme_api_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text[text.index("## Python API"):].split("\n## ", 1)[0]


def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block runs as written (``model`` is a stand-in with .grad arrays)."""
    section = _readme_api_section()
    code = section.split("```python\n", 1)[1].split("```", 1)[0]

    class Param:
        grad = np.array([3.0, 4.0])

    class Model:
        def named_parameters(self) -> list[tuple[str, Param]]:
            return [("w", Param())]

    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {"model": Model()})


def test_readme_lists_every_keyword() -> None:
    section = _readme_api_section()
    for fn in (gradinspect.inspect, gradinspect.compute_norms):
        for name, param in pyinspect.signature(fn).parameters.items():
            if param.kind == param.KEYWORD_ONLY:
                assert f"`{name}`" in section, (fn.__name__, name)


def test_a_tensor_named_like_a_group_is_not_merged_into_it() -> None:
    """Found in review: `--group-by '^(embed)\\.'` merged the unmatched tensor `embed` into the group `embed`."""
    g = {"embed": np.full(1, 3.0), "embed.w": np.full(1, 1.0), "embed.b": np.full(1, 2.0), "x.y": np.full(1, 1.0)}
    r = gradinspect.compute_norms(g, group_by=r"^(embed)\.", sort="none")
    assert [(t.name, t.members, t.sq) for t in r.tensors] == [("embed", 1, 9.0), ("embed", 2, 5.0),
                                                              ("x.y", 1, 1.0)]
