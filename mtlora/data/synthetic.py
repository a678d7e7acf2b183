"""A procedural multi-task data set: ray-cast 3-D shapes with every label derived from the geometry.

Each sample is rendered on demand from `(seed, split, index)`, so any sample
can be produced on its own, no arrays are held in memory, and train / val /
test come from different random streams. Scenes are small enough that a tiny
model learns every task in minutes on a CPU: classes differ in colour and
silhouette, shading follows the surface normals, and atmospheric fog makes
colour fade with depth.

Scene: a perspective camera (50 degree field of view), 1.3-2 m above a
tiled floor and looking down by 8-18 degrees, faces a striped back wall
7.5-10 m away. On the floor, 2.5-6 m from the camera, stand 1-4 shapes
(sphere, box, cylinder, cone, or a "figure": a cylinder body with a sphere
head, the one class with parts, as people are in PASCAL). Nearer shapes stand
lower in the image and look larger and less faded: the cues depth needs.

Labels (H = W = `size`):
- `semseg` uint8: 0 background (floor and wall), 1 sphere, 2 box, 3 cylinder,
  4 cone, 5 figure.
- `human_parts` uint8: on figure pixels 1 head, 2 torso (upper body), 3 legs
  (lower body, drawn darker); 0 elsewhere; all 255 (ignore) when no figure is
  visible, as PASCAL marks images without people.
- `sal` uint8 {0, 1}: the shape with the largest visible area.
- `normals` float32 (H, W, 3): unit outward surface normals in the NYU label
  frame of the real data sets: x right, y down, z towards the viewer. Floor
  and wall are real geometry and carry their own normals; no pixel is ignored.
- `depth` float32 (H, W): z-depth (distance along the optical axis) in metres.
- `edge` uint8 {0, 1}: occluding contours, one pixel wide, on the nearer side
  of every boundary between two shapes or a shape and the background.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mtlora.errors import ConfigError

# task -> output channels of its head, in the fixed task order (`register_synthetic_label` fills it).
SYNTHETIC_TASKS: dict[str, int] = {}
SYNTHETIC_CLASSES = ("background", "sphere", "box", "cylinder", "cone", "figure")
SYNTHETIC_PARTS = ("background", "head", "torso", "legs")
FIGURE_CLASS = 5

# A split is one more word of the seed, so the streams of two splits never coincide.
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}

_FOV_DEGREES = 50.0
_FOG_DENSITY = 0.07  # per metre: about 0.81 of an object's colour survives at 3 m, 0.63 at 6.5 m
_CLASS_COLOURS = {
    1: (0.85, 0.15, 0.10),  # red spheres
    2: (0.15, 0.70, 0.20),  # green boxes
    3: (0.15, 0.30, 0.85),  # blue cylinders
    4: (0.90, 0.80, 0.10),  # yellow cones
    5: (0.75, 0.20, 0.75),  # magenta figures
}
_HEAD_COLOUR = (0.95, 0.75, 0.60)  # figures: skin-coloured head, darker legs


@functools.lru_cache(maxsize=8)
def _camera_rays(size: int) -> np.ndarray:
    """Unit ray directions `(size * size, 3)` in the render frame: x right, y up, z forward."""
    tan_half = math.tan(math.radians(_FOV_DEGREES) / 2)
    centres = ((np.arange(size) + 0.5) / size * 2 - 1) * tan_half
    x, y = np.meshgrid(centres, -centres)  # row 0 is the top of the image, so y decreases downwards
    rays = np.stack([x, y, np.ones_like(x)], axis=-1).reshape(-1, 3)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    rays.flags.writeable = False  # shared by every scene of this size
    return rays


def _finite(t: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(t), t, 0.0)


def _hit_sphere(rays: np.ndarray, centre: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    b = rays @ centre
    disc = b * b - (centre @ centre - radius**2)
    t = np.where(disc >= 0, b - np.sqrt(np.maximum(disc, 0.0)), np.inf)
    t = np.where(t > 0, t, np.inf)
    normal = (rays * _finite(t)[:, None] - centre) / radius
    return t, normal


def _hit_box(
    rays: np.ndarray, centre: np.ndarray, half: np.ndarray, rotation: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in the box frame; `rotation` columns are the box axes in the render frame."""
    origin = -(centre @ rotation)
    local = rays @ rotation
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - origin) / local
        t2 = (half - origin) / local
    near_axis = np.minimum(t1, t2)
    t_near = near_axis.max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    axis = np.nan_to_num(near_axis, nan=-np.inf).argmax(axis=1)
    rows = np.arange(len(rays))
    normal_local = np.zeros_like(rays)
    normal_local[rows, axis] = -np.sign(local[rows, axis])
    return t, normal_local @ rotation.T


def _hit_cap(rays, origin, height, radius) -> np.ndarray:
    """Distance to the horizontal disc at `y = height` (object frame, origin = camera)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (height - origin[1]) / rays[:, 1]
    x = origin[0] + _finite(t) * rays[:, 0]
    z = origin[2] + _finite(t) * rays[:, 2]
    return np.where((t > 0) & (x * x + z * z <= radius * radius), t, np.inf)


def _hit_cylinder(
    rays: np.ndarray, centre: np.ndarray, radius: float, half_height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Capped cylinder with a vertical axis through `centre`."""
    origin = -centre
    a = rays[:, 0] ** 2 + rays[:, 2] ** 2
    b = 2 * (origin[0] * rays[:, 0] + origin[2] * rays[:, 2])
    c = origin[0] ** 2 + origin[2] ** 2 - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = np.where((disc >= 0) & (a > 1e-12), (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
    y_side = origin[1] + _finite(t_side) * rays[:, 1]
    t_side = np.where((t_side > 0) & (np.abs(y_side) <= half_height), t_side, np.inf)
    t_top = _hit_cap(rays, origin, half_height, radius)
    t_bottom = _hit_cap(rays, origin, -half_height, radius)
    t = np.minimum(t_side, np.minimum(t_top, t_bottom))
    point = rays * _finite(t)[:, None] + origin
    side_normal = point * np.array([1.0, 0.0, 1.0]) / radius
    normal = np.where((t == t_side)[:, None], side_normal, 0.0)
    normal[:, 1] += np.where(t == t_top, 1.0, 0.0) - np.where((t == t_bottom) & (t != t_side), 1.0, 0.0)
    return t, normal


def _hit_cone(
    rays: np.ndarray, centre: np.ndarray, radius: float, half_height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Upright cone: base disc of `radius` at `y = -half_height`, apex at `y = +half_height`."""
    origin = -centre
    k2 = (radius / (2 * half_height)) ** 2
    q0 = half_height - origin[1]  # height below the apex, at the camera
    a = rays[:, 0] ** 2 + rays[:, 2] ** 2 - k2 * rays[:, 1] ** 2
    b = 2 * (origin[0] * rays[:, 0] + origin[2] * rays[:, 2] + k2 * q0 * rays[:, 1])
    c = origin[0] ** 2 + origin[2] ** 2 - k2 * q0**2
    disc = b * b - 4 * a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    best = np.full(len(rays), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for sign in (-1.0, 1.0):
            t = np.where((disc >= 0) & (np.abs(a) > 1e-12), (-b + sign * root) / (2 * a), np.inf)
            y = origin[1] + _finite(t) * rays[:, 1]
            ok = (t > 0) & (y >= -half_height) & (y <= half_height)
            best = np.minimum(best, np.where(ok, t, np.inf))
    t_base = _hit_cap(rays, origin, -half_height, radius)
    t = np.minimum(best, t_base)
    point = rays * _finite(t)[:, None] + origin
    side = np.stack([point[:, 0], k2 * (half_height - point[:, 1]), point[:, 2]], axis=1)
    side /= np.maximum(np.linalg.norm(side, axis=1, keepdims=True), 1e-12)
    base = np.array([0.0, -1.0, 0.0])
    normal = np.where((t == t_base)[:, None], base, side)
    return t, normal


def _hit_figure(
    rays: np.ndarray, centre: np.ndarray, size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cylinder body with a sphere head, standing on its base below `centre`.

    Also returns the part label of each hit: 1 head, 2 torso (upper body), 3 legs (lower body).
    """
    body_radius, body_half = 0.45 * size, 0.8 * size
    head_radius = 0.4 * size
    body_centre = centre + np.array([0.0, body_half, 0.0])
    head_centre = body_centre + np.array([0.0, body_half + 0.85 * head_radius, 0.0])
    t_body, n_body = _hit_cylinder(rays, body_centre, body_radius, body_half)
    t_head, n_head = _hit_sphere(rays, head_centre, head_radius)
    head = t_head < t_body
    t = np.where(head, t_head, t_body)
    normal = np.where(head[:, None], n_head, n_body)
    height = (rays * _finite(t)[:, None] - body_centre)[:, 1]
    part = np.where(head, 1, np.where(height > 0, 2, 3)).astype(np.uint8)
    return t, normal, part


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    about_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    about_x = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return about_x @ about_y


def render_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """Render one random scene: the image and the geometry its labels are drawn from (`SYNTHETIC_LABELS`)."""
    # The render frame is the world's orientation (y up) with the camera at the origin;
    # the camera looks down by `pitch`, so the floor fills the lower part of the view.
    camera_height = rng.uniform(1.3, 2.0)
    pitch = math.radians(rng.uniform(8.0, 18.0))
    camera_to_world = _rotation(0.0, pitch)
    camera_rays = _camera_rays(size)
    rays = camera_rays @ camera_to_world.T
    tan_half = math.tan(math.radians(_FOV_DEGREES) / 2)

    with np.errstate(divide="ignore"):
        floor_t = np.where(rays[:, 1] < 0, -camera_height / rays[:, 1], np.inf)
    wall_yaw = rng.uniform(-0.35, 0.35)
    wall_normal = np.array([math.sin(wall_yaw), 0.0, -math.cos(wall_yaw)])
    wall_point = np.array([0.0, 0.0, rng.uniform(7.5, 10.0)])
    with np.errstate(divide="ignore"):
        wall_t = (wall_point @ wall_normal) / (rays @ wall_normal)
    wall_t = np.where(wall_t > 0, wall_t, np.inf)
    on_floor = floor_t < wall_t
    background_t = np.minimum(floor_t, wall_t)
    background_normal = np.where(on_floor[:, None], np.array([0.0, 1.0, 0.0]), wall_normal)

    hits, normals = [background_t], [background_normal]
    classes, colours, parts = [0], [None], [None]
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, 6))
        distance = rng.uniform(2.5, 6.0)
        reach = 0.8 * distance * tan_half
        base = np.array([rng.uniform(-reach, reach), -camera_height, distance])  # on the floor
        scale = rng.uniform(0.4, 0.8)
        part = None
        if cls == 1:
            t, n = _hit_sphere(rays, base + [0.0, scale, 0.0], scale)
        elif cls == 2:
            half = scale * rng.uniform(0.65, 1.0, size=3)
            rotation = _rotation(rng.uniform(0, math.pi / 2), 0.0)
            t, n = _hit_box(rays, base + [0.0, half[1], 0.0], half, rotation)
        elif cls == 3:
            half_height = scale * rng.uniform(0.8, 1.3)
            t, n = _hit_cylinder(
                rays, base + [0.0, half_height, 0.0], scale * rng.uniform(0.55, 0.8), half_height
            )
        elif cls == 4:
            half_height = scale * rng.uniform(0.8, 1.3)
            t, n = _hit_cone(rays, base + [0.0, half_height, 0.0], scale * rng.uniform(0.7, 1.0), half_height)
        else:
            t, n, part = _hit_figure(rays, base, 1.3 * scale)
        hits.append(t)
        normals.append(n)
        classes.append(cls)
        colours.append(np.clip(np.array(_CLASS_COLOURS[cls]) + rng.uniform(-0.08, 0.08, size=3), 0, 1))
        parts.append(part)

    t_all = np.stack(hits)  # (objects + 1, P); the background (floor and wall) is object 0
    instance = np.argmin(t_all, axis=0)
    rows = np.arange(len(rays))
    t = t_all[instance, rows]
    normal = np.stack(normals)[instance, rows]
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    point = rays * t[:, None]
    depth = t * camera_rays[:, 2]  # z-depth along the optical axis

    # Colour: Lambert + a little specular under one light from above the camera, then fog.
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.5, 1.0), -rng.uniform(0.3, 0.8)])
    light /= np.linalg.norm(light)
    diffuse = np.clip(normal @ light, 0, None)
    reflected = 2 * diffuse[:, None] * normal - light
    specular = np.clip(np.einsum("pc,pc->p", reflected, -rays), 0, None) ** 20
    albedo = np.empty((len(rays), 3))
    background = instance == 0
    albedo[background] = _background_texture(
        rng, point[background], on_floor[background], wall_normal, camera_height
    )
    for k in range(1, len(classes)):
        mine = instance == k
        albedo[mine] = colours[k]
        if parts[k] is not None:
            albedo[mine & (parts[k] == 1)] = _HEAD_COLOUR
            albedo[mine & (parts[k] == 3)] = colours[k] * 0.55
    shaded = albedo * (0.3 + 0.7 * diffuse[:, None]) + 0.25 * specular[:, None] * (instance > 0)[:, None]
    fog_colour = np.array([0.75, 0.78, 0.82]) + rng.uniform(-0.05, 0.05)
    survive = np.exp(-_FOG_DENSITY * t)[:, None]
    colour = shaded * survive + fog_colour * (1 - survive)
    colour += rng.normal(0.0, 0.015, size=colour.shape)
    image = np.clip(np.rint(colour * 255), 0, 255).astype(np.uint8).reshape(size, size, 3)

    # Back to the camera's axes, then to the label frame: y down, z towards the viewer (as NYUD's labels).
    normal_label = (normal @ camera_to_world) * np.array([1.0, -1.0, -1.0])
    return Scene(image=image, instance=instance.reshape(size, size), depth=depth.reshape(size, size),
                 classes=np.asarray(classes, dtype=np.uint8), parts=parts,
                 normals=normal_label.reshape(size, size, 3))


@dataclass(frozen=True)
class Scene:
    """One rendered scene: the image and the geometry every label is drawn from.

    instance (H, W): which object each pixel shows, 0 the background (floor and wall); classes: the class of
    each object; parts: each object's per-ray part labels (figures) or None; depth (H, W) z-depth in metres;
    normals (H, W, 3) unit normals in the label frame (x right, y down, z towards the viewer).
    """

    image: np.ndarray
    instance: np.ndarray
    depth: np.ndarray
    classes: np.ndarray
    parts: list
    normals: np.ndarray


# task -> how its label is drawn from a scene; SYNTHETIC_TASKS (above) holds each task's output channels.
SYNTHETIC_LABELS: dict[str, Callable[[Scene], np.ndarray]] = {}


def register_synthetic_label(task: str, channels: int):
    """Decorator: `draw(scene) -> label` (image layout, as a loader returns it) is task's synthetic label, and
    its head has `channels` outputs. A task's kind decides how the transforms move the label."""
    def add(draw):
        SYNTHETIC_TASKS[task] = channels
        SYNTHETIC_LABELS[task] = draw
        return draw
    return add


@register_synthetic_label("semseg", channels=len(SYNTHETIC_CLASSES))
def _semseg(scene: Scene) -> np.ndarray:
    return scene.classes[scene.instance]


@register_synthetic_label("human_parts", channels=len(SYNTHETIC_PARTS))
def _human_parts(scene: Scene) -> np.ndarray:
    if not (scene.classes[scene.instance] == FIGURE_CLASS).any():
        return np.full(scene.instance.shape, 255, dtype=np.uint8)
    human_parts = np.zeros(scene.instance.shape, dtype=np.uint8)
    for k, part in enumerate(scene.parts):
        if part is not None:
            mine = scene.instance == k
            human_parts[mine] = part.reshape(scene.instance.shape)[mine]
    return human_parts


@register_synthetic_label("sal", channels=1)
def _saliency(scene: Scene) -> np.ndarray:
    areas = np.bincount(scene.instance.ravel(), minlength=len(scene.classes))
    areas[0] = 0
    if areas.max() == 0:
        return np.zeros(scene.instance.shape, dtype=np.uint8)
    return (scene.instance == int(np.argmax(areas))).astype(np.uint8)


@register_synthetic_label("normals", channels=3)
def _normals(scene: Scene) -> np.ndarray:
    return scene.normals.astype(np.float32)


@register_synthetic_label("edge", channels=1)
def _edge(scene: Scene) -> np.ndarray:
    return _occluding_contours(scene.instance, scene.depth)


@register_synthetic_label("depth", channels=1)
def _depth(scene: Scene) -> np.ndarray:
    return scene.depth.astype(np.float32)


def _background_texture(
    rng: np.random.Generator,
    points: np.ndarray,
    on_floor: np.ndarray,
    wall_normal: np.ndarray,
    camera_height: float,
) -> np.ndarray:
    """Low-saturation floor tiles and wall stripes, laid out in the world so they recede in perspective."""
    albedo = np.empty((len(points), 3))
    floor_base = rng.uniform(0.35, 0.6) + rng.uniform(-0.06, 0.06, size=3)
    tile = rng.uniform(0.4, 0.9)
    floor = points[on_floor]
    checker = (np.floor(floor[:, 0] / tile) + np.floor(floor[:, 2] / tile)) % 2
    albedo[on_floor] = np.clip(floor_base + 0.07 * (2 * checker[:, None] - 1), 0, 1)

    u_axis = np.array([-wall_normal[2], 0.0, wall_normal[0]])  # along the wall, horizontal
    wall = points[~on_floor]
    u, v = wall @ u_axis, wall[:, 1] + camera_height
    wall_base = rng.uniform(0.45, 0.7) + rng.uniform(-0.06, 0.06, size=3)
    frequency = rng.uniform(0.3, 1.2, size=2)
    stripes = 0.08 * np.sin(2 * math.pi * (frequency[0] * u + frequency[1] * v) + rng.uniform(0, 2 * math.pi))
    albedo[~on_floor] = np.clip(wall_base[None, :] + stripes[:, None], 0, 1)
    return albedo


def _occluding_contours(instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """1 on pixels that border another object (4-neighbourhood) and lie in front of it."""
    edge = np.zeros(instance.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None), slice(None)]
        b = [slice(None), slice(None)]
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        a, b = tuple(a), tuple(b)
        differs = instance[a] != instance[b]
        edge[a] |= differs & (depth[a] < depth[b])
        edge[b] |= differs & (depth[b] < depth[a])
    return edge.astype(np.uint8)


class SyntheticMultiTask:
    """Indexable synthetic multi-task data set; samples are rendered on access.

    A sample is a dict of numpy arrays: `image` uint8 `(size, size, 3)`, one
    entry per requested task (see the module docstring) and `meta` with `id`
    (`"<split>-<index>"`) and `size` `(H, W)`.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 1000,
        size: int = 64,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
    ):
        if split not in _SPLIT_STREAMS:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(_SPLIT_STREAMS)}")
        if num_samples < 1:
            raise ConfigError(f"num_samples must be positive, got {num_samples}")
        if size < 8:
            raise ConfigError(f"size must be at least 8 pixels, got {size}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        tasks = list(SYNTHETIC_TASKS) if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if unknown:
            raise ConfigError(
                f"the synthetic data set has no task(s) {unknown}; available: {', '.join(SYNTHETIC_TASKS)}"
            )
        self.split = split
        self.num_samples = num_samples
        self.size = size
        self.seed = seed
        self.tasks = tasks

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index])
        scene = render_scene(rng, self.size)
        sample = {"image": scene.image} | {task: SYNTHETIC_LABELS[task](scene) for task in self.tasks}
        sample["meta"] = {"id": f"{self.split}-{index:06d}", "size": (self.size, self.size)}
        return sample
