"""Stage-1 validation computes each batch's image pass once: the losses' own features feed the retrieval recall."""

import torch

from qformer.transforms import eval_transform
from stages.data.annotations import load_annotations
from stages.data.captions import CaptionDataset, Collate
from stages.data.synthetic import make_dataset
from stages.data.text import BertText
from stages.train.stage1 import Stage1Module


def test_validation_encodes_each_image_once_and_keeps_the_losses_features(tmp_path):
    make_dataset(tmp_path, num_images=20, seed=0)
    module = Stage1Module(tokenizer=str(tmp_path), val_retrieval="itm").eval()
    dataset = CaptionDataset(load_annotations(tmp_path / "val.json"), tmp_path, eval_transform(32))
    batch = Collate(BertText(module.tokenizer, 32))([dataset[i] for i in range(4)])
    calls = []
    encode = module.model.encode_image
    module.model.encode_image = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    module.log = lambda *args, **kwargs: None  # no trainer here
    with torch.no_grad():
        module.validation_step(batch, 0)
        expected_feats = module.model.image_feats(module.model.query_forward(encode(batch["pixel_values"])).last_hidden_state)
    assert calls == [4]  # one image pass for the losses and the recall buffer together
    output = module.val_outputs[0]
    torch.testing.assert_close(output["image_feats"], expected_feats)
    torch.testing.assert_close(output["image_embeds"], encode(batch["pixel_values"]))
