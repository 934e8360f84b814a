import numpy as np
import pytest

from medaug.io import Volume
from medaug.preprocessing import IntensityWindow, PercentileNormalization, preprocess, preprocess_case, slice_volume


def test_window_roundtrip_and_clipping():
    w = IntensityWindow(-160, 240)
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    model = w.to_model(hu)
    np.testing.assert_allclose(model, [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(w.to_source(model[1:4]), hu[1:4], atol=1e-4)
    with pytest.raises(ValueError, match="hi > lo"):
        IntensityWindow(10, 10)


def test_preprocess_reorients_to_ras_and_pads_with_air():
    array = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2) * 10
    lps_like = np.diag([-2.0, -2.0, 3.0, 1.0])  # axes point left and posterior
    out = preprocess(Volume(array, lps_like), IntensityWindow(0, 470), spatial_size=(8, 6, 2))
    assert out.array.shape == (8, 6, 2)
    assert np.all(np.diag(out.affine)[:3] > 0)  # RAS after orientation
    assert out.array[0].max() == -1.0 and out.array[-1].max() == -1.0  # padded columns are "air"
    # the voxel at RAS-most corner of the data is the former index (0, 0)
    np.testing.assert_allclose(out.array[2:6, :, 0], (np.flip(array[:, :, 0], (0, 1)) / 470) * 2 - 1, atol=1e-5)


def test_resampling_changes_spacing_in_affine():
    vol = Volume(np.zeros((10, 10, 4), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    out = preprocess(vol, IntensityWindow(-1, 1), spatial_size=(-1, -1, -1), pixdim=(2.0, 2.0, 0))
    assert out.array.shape[:2] == (6, 6)  # 9 mm between first and last centre, at 2 mm: 6 centres
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0), [2, 2, 2], atol=1e-6)


def test_slice_affine_points_at_the_slice():
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[:3, 3] = [0, 0, 10]
    s = slice_volume(Volume(np.zeros((3, 3, 5), np.float32), affine), 2)
    assert s.array.shape == (3, 3, 1)
    assert s.affine[2, 3] == pytest.approx(15.0)


def test_mr_percentile_window_and_its_inverse():
    rng = np.random.default_rng(0)
    array = np.zeros((10, 10, 10), np.float32)
    array[2:8, 2:8, 2:8] = rng.uniform(100, 1100, size=(6, 6, 6))  # background 0, tissue 100-1100 a.u.
    norm = PercentileNormalization(1.0, 99.0)
    window = norm.window_for(array)
    tissue = array[array != 0]
    assert window.lo == pytest.approx(np.percentile(tissue, 1))
    assert window.hi == pytest.approx(np.percentile(tissue, 99))
    assert window.unit == "MR a.u."
    prepared = preprocess_case(Volume(array, np.eye(4)), norm, spatial_size=(10, 10, 10))
    assert prepared.window == window
    inside = (array >= window.lo) & (array <= window.hi)
    np.testing.assert_allclose(window.to_source(prepared.volume.array)[inside], array[inside], rtol=1e-4)
    with pytest.raises(ValueError, match="percentiles"):
        PercentileNormalization(99, 1)


def test_foreground_crop_centres_the_body_and_carries_the_mask():
    array = np.full((40, 40, 1), -1000.0, np.float32)
    array[2:12, 4:12, 0] = 40.0  # the body sits in a corner of a large field of view
    mask = np.zeros_like(array)
    mask[5:7, 6:8, 0] = 1
    centre = preprocess_case(
        Volume(array, np.eye(4)), IntensityWindow(-160, 240), (16, 16, -1), mask=mask, crop="center"
    )
    fg = preprocess_case(
        Volume(array, np.eye(4)), IntensityWindow(-160, 240), (16, 16, -1), mask=mask, crop="foreground", margin=1
    )
    assert (centre.volume.array > -1).sum() < 10 * 8  # the centre crop cuts the body off
    assert (fg.volume.array > -1).sum() == 10 * 8  # the foreground crop keeps all of it
    body = np.argwhere(fg.volume.array[:, :, 0] > -1)
    assert abs(body.mean(0) - 7.5).max() <= 1.0  # ...in the middle
    assert fg.mask.sum() == 4 and fg.volume.array[fg.mask > 0].min() > -1  # the mask moved with the image
    # the affine still maps voxels to the same world position
    i, j = np.argwhere(fg.mask[:, :, 0])[0]
    np.testing.assert_allclose((fg.volume.affine @ [i, j, 0, 1])[:2], [5, 6])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_label_map_is_resampled_nearest_neighbour_with_its_values_and_world_position(spatial_dims):
    shape = (12, 12, 1) if spatial_dims == 2 else (12, 12, 12)
    array = np.full(shape, 40.0, np.float32)
    mask = np.zeros(shape, np.int64)
    box = (slice(2, 6), slice(6, 10)) + ((slice(0, 1),) if spatial_dims == 2 else (slice(4, 8),))
    mask[box] = 7  # a label value other than 1 survives as it is
    mask[8:10, 2:4] = 2
    array[mask == 7] = 200.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    pixdim = (2.0, 2.0, 0.0) if spatial_dims == 2 else (2.0, 2.0, 2.0)
    size = (6, 6, -1) if spatial_dims == 2 else (6, 6, 6)
    out = preprocess_case(Volume(array, affine), IntensityWindow(-160, 240), size, pixdim, mask=mask)
    assert out.mask.dtype == np.int64 and out.mask.shape == out.volume.array.shape
    assert set(np.unique(out.mask)) == {0, 2, 7}  # nearest neighbour: no blended values
    assert out.volume.array[out.mask == 7].min() > 0.5  # the label still covers the bright box
    centre = np.argwhere(out.mask == 7).mean(0)
    world = (out.volume.affine @ [*centre, *([0] * (3 - len(centre))), 1])[:2]
    np.testing.assert_allclose(world, [3.5, 7.5], atol=1.01)  # where the box was, within one output voxel
