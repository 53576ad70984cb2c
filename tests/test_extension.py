"""The compiled extension fastkd._C is installed and registers its ops with the dispatcher."""
import torch

import fastkd


def test_extension_is_built_and_registered():
    info = fastkd.extension_info()
    assert info.split("+")[0] == "cpu"
    assert info == torch.ops.fastkd._build_info()
    if torch.cuda.is_available():
        assert "+cuda" in info, "a machine with a GPU should build the CUDA sources"
