"""Small helpers shared by the server/client tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def frame(seed: int, h: int = 80, w: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def pytorch_reference(run_dir, img: np.ndarray, class_id: int):
    """What the served ensemble must return for `img`: PyTorch model on the PIL-resized frame, map
    resized back to the frame's size with PIL bilinear (as the postprocess step does)."""
    import torch

    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import resize_rgb

    model, info = load_model(run_dir)
    x = torch.from_numpy(resize_rgb(img, info.arch.image_size))[None]
    out = model.predict(x, torch.tensor([class_id]))
    amap = out["anomaly_map"][0].numpy().astype(np.float32)
    amap = np.asarray(Image.fromarray(amap, mode="F").resize((img.shape[1], img.shape[0]), Image.BILINEAR))
    return float(out["anomaly_score"][0, 0]), amap


def infer_score_http(http_url: str, h: int = 48, w: int = 64):
    """One black frame of class 0 through the raw ensemble over HTTP; returns the score array."""
    import tritonclient.http as th

    from promptmad import contract

    client = th.InferenceServerClient(http_url)
    img, cid = np.zeros((1, h, w, 3), np.uint8), np.zeros((1, 1), np.int32)
    inputs = [th.InferInput(contract.IMAGE.name, img.shape, contract.IMAGE.dtype),
              th.InferInput(contract.CLASS_ID.name, cid.shape, contract.CLASS_ID.dtype)]
    inputs[0].set_data_from_numpy(img)
    inputs[1].set_data_from_numpy(cid)
    return client.infer(contract.MODEL_NAME, inputs).as_numpy(contract.ANOMALY_SCORE.name)


def infer(client, model: str, tensors):
    """One request through the http or grpc module's client: tensors are (name, array, dtype)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    inputs = []
    for name, arr, dtype in tensors:
        i = module.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    return client.infer(model, inputs)
