"""Image transforms shared by training, evaluation and inference (as open_clip keeps `transform.py`)."""

from __future__ import annotations

from torchvision import transforms as T

from qformer.vision import IMAGE_MEAN, IMAGE_STD


def train_transform(image_size: int, hflip: bool = True, crop_scale: tuple[float, float] = (0.5, 1.0)) -> T.Compose:
    steps = [T.RandomResizedCrop(image_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGE_MEAN, IMAGE_STD)])


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGE_MEAN, IMAGE_STD),
        ]
    )
