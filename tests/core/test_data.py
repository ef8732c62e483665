"""Datasets: specs match batches, batches are deterministic, splits are disjoint, user paths stay in the data root."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from scaletune.data import DataError, dataset_names, dataset_spec, get_dataset, registry
from scaletune.data.pytext import is_eval_file, load_corpus

SMALL_PYTEXT = {"max_bytes": 100_000, "seq_len": 16, "eval_windows": 32}
BUILTINS = [("digits", {}), ("digits", {"flatten": True}), ("teacher", {"features": 8, "classes": 4}),
            ("pytext", SMALL_PYTEXT), ("scales", {"eval_size": 64})]


def take(batches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


def assert_same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_all_builtins_are_listed() -> None:
    assert {"digits", "teacher", "scales", "pytext", "npz", "text", "cifar10"} <= set(dataset_names())


@pytest.mark.parametrize(("name", "args"), BUILTINS)
def test_batches_match_the_spec(name: str, args: dict) -> None:
    spec = dataset_spec(name, args)
    dataset = get_dataset(name, args)
    assert dataset.spec == spec
    for x, y in [next(dataset.train_batches(5, seed=0)), next(dataset.eval_batches(5))]:
        assert x.device.type == "cpu" and tuple(x.shape) == (5, *spec.input_shape)
        assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < spec.num_outputs
        if spec.task == "lm":
            assert x.dtype == torch.int64 and y.shape == x.shape
            assert torch.equal(x[:, 1:], y[:, :-1])
        else:
            assert x.dtype == torch.float32 and y.shape == (5,)


@pytest.mark.parametrize(("name", "args"), BUILTINS)
def test_batches_are_deterministic(name: str, args: dict) -> None:
    first, again = get_dataset(name, args), get_dataset(name, args)
    assert_same(take(first.train_batches(7, seed=3), 4), take(again.train_batches(7, seed=3), 4))
    other_seed = take(first.train_batches(7, seed=4), 1)[0][0]
    assert not torch.equal(take(first.train_batches(7, seed=3), 1)[0][0], other_seed)
    assert_same(list(first.eval_batches(64)), list(again.eval_batches(64)))


def test_eval_set_does_not_depend_on_batch_size() -> None:
    dataset = get_dataset("teacher", {"eval_size": 100})
    small = list(dataset.eval_batches(7))
    assert len(small) == 15 and sum(len(y) for _, y in small) == 100
    whole_x, whole_y = next(dataset.eval_batches(1000))
    assert torch.equal(torch.cat([x for x, _ in small]), whole_x)
    assert torch.equal(torch.cat([y for _, y in small]), whole_y)


def test_digits_split_is_disjoint_stratified_and_standardised() -> None:
    dataset = get_dataset("digits", {"flatten": True})
    x_eval, y_eval = next(dataset.eval_batches(10_000))
    x_train, y_train = next(dataset.train_batches(1437, seed=0))  # one full epoch, every train image once
    assert len(x_eval) == 360
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-2
    assert torch.bincount(y_eval, minlength=10).min() >= 35  # stratified: every digit about 10% of eval
    assert len(rows(x_train)) == 1437 and not rows(x_eval) & rows(x_train)


def test_teacher_seed_changes_the_task_and_eval_differs_from_train() -> None:
    a, b = get_dataset("teacher", {"seed": 1}), get_dataset("teacher", {"seed": 2})
    assert not torch.equal(next(a.eval_batches(64))[0], next(b.eval_batches(64))[0])
    x_eval = next(a.eval_batches(4096))[0]
    assert not rows(x_eval) & rows(next(a.train_batches(512, seed=0))[0])


def test_teacher_labels_are_a_function_of_the_inputs() -> None:
    """Without temperature the same x always gets the same label: the task is learnable to 100%."""
    dataset = get_dataset("teacher", {"features": 4, "classes": 3})
    x, y = next(dataset.train_batches(256, seed=0))
    assert len(torch.unique(y)) == 3
    sampled = get_dataset("teacher", {"features": 4, "classes": 3, "temperature": 5.0})
    x_hot, y_hot = next(sampled.train_batches(256, seed=0))
    assert torch.equal(x, x_hot) and not torch.equal(y, y_hot)


def test_scales_labels_name_the_blob_quadrant_and_the_glyph() -> None:
    """Without noise the blob's quadrant holds the most light and the glyph is the only sharp structure."""
    from scaletune.data.scales import GLYPHS, ScalesArgs, scales_images
    from scaletune.data.teacher import derived_generator

    x, y = scales_images(ScalesArgs(noise=0.0), 64, derived_generator(5))
    quadrants = x[:, 0].reshape(64, 2, 16, 2, 16).sum(dim=(2, 4)).reshape(64, 4)
    assert torch.equal(quadrants.argmax(dim=1), y // 4)
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    sharp = (x - smooth)[:, 0]
    kinds = torch.nn.functional.conv2d((x - smooth), (GLYPHS - GLYPHS.mean(dim=(1, 2), keepdim=True))[:, None])
    assert sharp.abs().amax(dim=(1, 2)).min() > 0.5
    assert torch.equal(kinds.amax(dim=(2, 3)).argmax(dim=1), y % 4)
    assert len(torch.unique(y)) == 16
    with pytest.raises(DataError, match="size: Input should be greater than or equal to 32"):
        dataset_spec("scales", {"size": 16})


def test_scales_texture_is_deterministic_labelled_and_nearly_invisible_to_patch_16_over_base_8() -> None:
    """fine='texture': the label's fine part is a period-2 texture that a PI-resized 16x16 kernel barely sees."""
    from scaletune.data.scales import ScalesArgs, scales_images
    from scaletune.data.teacher import derived_generator
    from scaletune.models.patch_embed import pi_resize_matrix

    args = ScalesArgs(noise=0.0, fine="texture", glyph=1.0)
    x, y = scales_images(args, 64, derived_generator(5))
    again, y_again = scales_images(args, 64, derived_generator(5))
    assert x.shape == (64, 1, 32, 32) and torch.equal(x, again) and torch.equal(y, y_again)
    assert not torch.equal(x, scales_images(args, 64, derived_generator(6))[0]) and len(torch.unique(y)) == 16
    quadrants = x[:, 0].reshape(64, 2, 16, 2, 16).sum(dim=(2, 4)).reshape(64, 4)
    assert torch.equal(quadrants.argmax(dim=1), y // 4)
    i = torch.arange(32)
    rows, cols = torch.meshgrid(i, i, indexing="ij")
    patterns = torch.stack([(-1.0) ** (rows + cols), (-1.0) ** cols, (-1.0) ** rows])  # checker, stripes |, stripes -
    scores = torch.einsum("nhw,khw->nk", x[:, 0], patterns)  # a 16x16 square scores 256, the smooth blob ~0
    kinds = torch.where(scores.amax(dim=1) > 128, scores.argmax(dim=1), 3)
    assert torch.equal(kinds, y % 4)

    span, _ = torch.linalg.qr(pi_resize_matrix(8, 16))  # what every patch-16 kernel over an 8x8 base can see

    def visible(fine: str) -> float:
        """Fraction of the fine cue's energy (amplitude 2 minus amplitude 1, same draws) a patch-16 kernel sees."""
        one, two = (scales_images(ScalesArgs(fine=fine, glyph=a), 256, derived_generator(5))[0] for a in (1.0, 2.0))
        cue = (two - one)[:, 0].reshape(256, 2, 16, 2, 16).permute(0, 1, 3, 2, 4).reshape(-1, 256).double()
        return float(((cue @ span) ** 2).sum() / (cue**2).sum())

    assert visible("texture") < 0.05 and visible("glyph") > 0.3


def test_pytext_eval_is_whole_files_held_out_by_path() -> None:
    corpus = load_corpus(SMALL_PYTEXT["max_bytes"])
    assert corpus.eval_files and not set(corpus.eval_files) & set(corpus.train_files)
    assert all(is_eval_file(f) for f in corpus.eval_files) and not any(is_eval_file(f) for f in corpus.train_files)
    assert len(corpus.train) + len(corpus.eval) == SMALL_PYTEXT["max_bytes"]
    eval_text = corpus.eval.numpy().tobytes()
    train_text = corpus.train.numpy().tobytes()
    dataset = get_dataset("pytext", SMALL_PYTEXT)
    eval_x, _ = next(dataset.eval_batches(1000))
    assert len(eval_x) == SMALL_PYTEXT["eval_windows"]
    assert all(bytes(window.tolist()) in eval_text for window in eval_x)
    train_x, _ = next(dataset.train_batches(64, seed=0))
    assert all(bytes(window.tolist()) in train_text for window in train_x)


def test_pytext_excludes_tests_and_idlelib() -> None:
    corpus = load_corpus(8_000_000)
    names = corpus.train_files + corpus.eval_files
    assert corpus.train_files == tuple(sorted(corpus.train_files)) and len(corpus.eval_files) >= 10
    assert not [n for n in names if {"test", "tests", "idlelib", "site-packages"} & set(n.split("/")[:-1])]


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("nope", {}, "available datasets: cifar10, digits"),
        ("digits", {"flaten": True}, "Allowed args: flatten (bool, default False)"),
        ("digits", {"flatten": "yes"}, "flatten: Input should be a valid boolean"),
        ("teacher", {"classes": 1}, "classes: Input should be greater than or equal to 2"),
        ("pytext", {"seq_len": 2.5}, "seq_len: Input should be a valid integer"),
        ("npz", {}, "path: Field required"),
    ],
)
def test_bad_names_and_args_are_refused_with_what_is_allowed(name: str, args: dict, expected: str) -> None:
    with pytest.raises(DataError) as caught:
        dataset_spec(name, args)
    assert expected in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_pytext_too_small_for_seq_len_says_what_to_change() -> None:
    with pytest.raises(DataError, match="raise it"):
        get_dataset("pytext", {"max_bytes": 1024, "seq_len": 64})


# ---- user files ----


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)


def classification_arrays(n: int = 30, features: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, features)).astype(np.float32), "y": rng.integers(0, 3, size=n)}


def test_npz_splits_off_eval_deterministically_and_disjointly(tmp_path: Path) -> None:
    write_npz(tmp_path / "d.npz", **classification_arrays(n=40))
    spec = dataset_spec("npz", {"path": "d.npz"}, tmp_path)
    assert spec.input_shape == (5,) and spec.num_outputs == 3 and spec.task == "classification"
    dataset = get_dataset("npz", {"path": "d.npz", "eval_fraction": 0.25}, tmp_path)
    x_eval, y_eval = next(dataset.eval_batches(100))
    x_train, _ = next(dataset.train_batches(30, seed=0))
    assert len(x_eval) == 10 and len(rows(x_train)) == 30 and not rows(x_eval) & rows(x_train)
    again = get_dataset("npz", {"path": "d.npz", "eval_fraction": 0.25}, str(tmp_path))
    assert torch.equal(next(again.eval_batches(100))[0], x_eval)


def test_compressed_npz_with_its_own_eval_arrays_uses_them(tmp_path: Path) -> None:
    train, held_out = classification_arrays(n=20), classification_arrays(n=8)
    np.savez_compressed(tmp_path / "d.npz", x=train["x"].reshape(20, 1, 5), y=train["y"],
              x_eval=held_out["x"].reshape(8, 1, 5), y_eval=held_out["y"] + 4)
    assert dataset_spec("npz", {"path": "d.npz"}, tmp_path).num_outputs == 7  # labels of both splits count
    x_eval, y_eval = next(get_dataset("npz", {"path": "d.npz"}, tmp_path).eval_batches(100))
    assert x_eval.shape == (8, 1, 5) and torch.equal(y_eval, torch.from_numpy(held_out["y"] + 4))


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"x": np.zeros((4, 3), np.float32)}, "must hold arrays 'x' and 'y'"),
        ({"x": np.zeros((4, 3), np.int64), "y": np.zeros(4, np.int64)}, "'x' must be a float array"),
        ({"x": np.zeros(4, np.float32), "y": np.zeros(4, np.int64)}, "found float32 (4,)"),
        ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(5, np.int64)}, "shaped (4,)"),
        ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(4, np.float32)}, "integer label array"),
        ({"x": np.zeros((4, 3), np.float32), "y": -np.ones(4, np.int64)}, "negative labels"),
        ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(4, np.int64), "x_eval": np.zeros((2, 3), np.float32)},
         "optionally both 'x_eval' and 'y_eval'"),
        ({"x": np.zeros((4, 3), np.float32), "y": np.zeros(4, np.int64),
          "x_eval": np.zeros((2, 4), np.float32), "y_eval": np.zeros(2, np.int64)}, "they must match"),
    ],
)
def test_npz_with_wrong_arrays_is_refused(tmp_path: Path, arrays: dict[str, np.ndarray], expected: str) -> None:
    write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as caught:
        dataset_spec("npz", {"path": "bad.npz"}, tmp_path)
    assert expected in str(caught.value)


def test_npz_with_nan_is_refused_on_load(tmp_path: Path) -> None:
    arrays = classification_arrays()
    arrays["x"][3, 1] = np.nan
    write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match="NaN"):
        get_dataset("npz", {"path": "d.npz"}, tmp_path)


def test_a_file_that_is_not_npz_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz archive"):
        dataset_spec("npz", {"path": "d.npz"}, tmp_path)


@pytest.fixture
def root_with_outside(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for folder in (root, outside):
        write_npz(folder / "d.npz", **classification_arrays())
        (folder / "t.txt").write_text("hello world " * 1000)
    return root, outside


@pytest.mark.parametrize("name", ["npz", "text"])
def test_paths_escaping_the_data_root_are_refused(root_with_outside: tuple[Path, Path], name: str) -> None:
    root, outside = root_with_outside
    filename = "d.npz" if name == "npz" else "t.txt"
    os.symlink(outside / filename, root / f"link_{filename}")
    escapes = [f"../outside/{filename}", str(outside / filename), f"link_{filename}", f"sub/../../outside/{filename}"]
    for path in escapes:
        for call in (dataset_spec, get_dataset):
            with pytest.raises(DataError, match=f"outside the data root {root.resolve()}"):
                call(name, {"path": path}, root)
    assert get_dataset(name, {"path": str(root / filename)}, root).spec.task  # absolute but inside: fine


def test_missing_file_and_missing_data_root_are_refused(root_with_outside: tuple[Path, Path]) -> None:
    root, _ = root_with_outside
    with pytest.raises(DataError, match="no file at 'missing.npz'.*under the data root"):
        dataset_spec("npz", {"path": "missing.npz"}, root)
    with pytest.raises(DataError, match="no file at 'sub'"):
        (root / "sub").mkdir()
        dataset_spec("text", {"path": "sub"}, root)
    with pytest.raises(DataError, match="no data root is configured"):
        dataset_spec("npz", {"path": "d.npz"}, None)


def test_text_is_split_by_position(tmp_path: Path) -> None:
    text = "".join(f"line {i}: héllo\n" for i in range(400)).encode()
    (tmp_path / "t.txt").write_bytes(text)
    args = {"path": "t.txt", "seq_len": 8, "eval_fraction": 0.1, "eval_windows": 16}
    assert dataset_spec("text", args, tmp_path).input_shape == (8,)
    dataset = get_dataset("text", args, tmp_path)
    cut = len(text) - int(len(text) * 0.1)
    eval_x, eval_y = next(dataset.eval_batches(100))
    assert eval_x.shape == (16, 8) and torch.equal(eval_x[:, 1:], eval_y[:, :-1])
    assert all(bytes(w.tolist()) in text[cut:] for w in eval_x)
    assert all(bytes(w.tolist()) in text[:cut] for w in next(dataset.train_batches(32, seed=1))[0])


def test_text_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"abc" * 100 + b"\xff\xfe")
    with pytest.raises(DataError, match="not UTF-8.*at byte 300"):
        get_dataset("text", {"path": "t.txt"}, tmp_path)


# ---- cifar10 ----


def write_fake_cifar(folder: Path, per_batch: int = 6, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(per_batch)], b"batch_label": b"fake"}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar10_loads_standardised_images(tmp_path: Path, protocol: int) -> None:
    write_fake_cifar(tmp_path / "cifar", protocol=protocol)
    spec = dataset_spec("cifar10", {"path": "cifar"}, tmp_path)
    assert spec.input_shape == (3, 32, 32) and spec.num_outputs == 10
    dataset = get_dataset("cifar10", {"path": "cifar"}, tmp_path)
    x, y = next(dataset.train_batches(30, seed=0))  # all 5 x 6 train images
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    channel_means = x.mean(dim=(0, 2, 3))
    assert torch.allclose(channel_means, torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)
    x_eval, y_eval = next(dataset.eval_batches(100))
    assert x_eval.shape == (6, 3, 32, 32) and y_eval.tolist() == [(5 + j) % 10 for j in range(6)]


def test_cifar10_max_train_subsamples(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar")
    dataset = get_dataset("cifar10", {"path": "cifar", "max_train": 7}, tmp_path)
    x, _ = next(dataset.train_batches(7, seed=0))
    assert len(rows(x)) == 7 and rows(next(dataset.train_batches(7, seed=5))[0]) == rows(x)


def test_cifar10_missing_batches_are_named(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="lacks data_batch_3"):
        dataset_spec("cifar10", {"path": "cifar"}, tmp_path)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_pickles_cannot_run_code(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar")
    with (tmp_path / "cifar" / "test_batch").open("wb") as f:
        pickle.dump({b"data": Boom(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        get_dataset("cifar10", {"path": "cifar"}, tmp_path)


def test_cifar10_wrong_image_size_is_refused(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar")
    with (tmp_path / "cifar" / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"expected b'data' uint8 \(N, 3072\)"):
        get_dataset("cifar10", {"path": "cifar"}, tmp_path)


# ---- plugins ----

PLUGIN_MODULE = '''
from scaletune.data.registry import DatasetArgs, DatasetKind
from scaletune.data.teacher import TeacherArgs, load_teacher, teacher_spec

class NoiseArgs(DatasetArgs):
    size: int = 3

KIND = DatasetKind(
    name="noise",
    args_model=NoiseArgs,
    spec=lambda args, root: teacher_spec(TeacherArgs(features=args.size), root),
    load=lambda args, root: load_teacher(TeacherArgs(features=args.size), root),
)
NOT_A_KIND = "just a string"
'''


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A distribution on sys.path exporting datasets under the scaletune.datasets entry point group."""
    (tmp_path / "my_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "my_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[scaletune.datasets]\nnoise = my_plugin:KIND\nbroken = my_plugin:NOT_A_KIND\ndigits = my_plugin:KIND\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._plugin_entry_points.cache_clear()
    yield
    registry._plugin_entry_points.cache_clear()


def test_installed_plugins_are_listed_and_loaded(installed_plugin: None) -> None:
    assert {"noise", "broken", "digits"} <= set(dataset_names())
    assert dataset_spec("noise", {"size": 5}).input_shape == (5,)
    assert next(get_dataset("noise", {}).train_batches(2, seed=0))[0].shape == (2, 3)
    with pytest.raises(DataError, match="Allowed args: size"):
        dataset_spec("noise", {"flatten": True})
    with pytest.raises(DataError, match="does not export a DatasetKind"):
        dataset_spec("broken", {})


def test_a_plugin_cannot_replace_a_builtin(installed_plugin: None) -> None:
    assert dataset_spec("digits", {"flatten": True}).input_shape == (64,)  # the plugin's "digits" takes no flatten
