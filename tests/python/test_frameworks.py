"""Real checkpoints written by code nobody here wrote: the safetensors library, transformers'
save_pretrained (sharded) and timm. Each test is skipped where its library is not importable
(Debian has none of them; the GPU machine has all three), and uses CUDA when
WEIGHTD_TEST_GPU=1 and torch sees a device."""

import gc
import os
import shutil
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

import weightd  # noqa: E402

CUDA = os.environ.get("WEIGHTD_TEST_GPU") == "1" and torch.cuda.is_available()
DEVICE = "cuda:0" if CUDA else "cpu"


def have(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


class Frameworks(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="wdpy-fw-")
        cls.daemons = []

    @classmethod
    def tearDownClass(cls):
        gc.collect()
        for d in cls.daemons:
            d.close()
        shutil.rmtree(cls.root, ignore_errors=True)

    def serve(self, models):
        d = support.Daemon(models)
        self.daemons.append(d)
        return weightd.connect(d.endpoint, timeout=10)

    @unittest.skipUnless(have("safetensors"), "the safetensors library is not installed")
    def test_files_of_the_safetensors_library_come_back_bitwise(self):
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(3)
        tensors = {
            "f32": torch.randn(33, 7, generator=g),
            "f16": torch.randn(5, 9, generator=g).half(),
            "bf16": torch.randn(17, generator=g).bfloat16(),
            "i64": torch.randint(-2**40, 2**40, (3, 3), generator=g),
            "u8": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
            "bool": torch.rand(6, generator=g) > 0.5,
        }
        for name in ("float8_e4m3fn", "float8_e5m2"):
            if hasattr(torch, name):
                tensors[name] = torch.randn(4, 4, generator=g).to(getattr(torch, name))
        directory = os.path.join(self.root, "st")
        os.makedirs(directory)
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        client = self.serve({"st": directory})
        with client.acquire("st", device=DEVICE) as lease:
            self.assertEqual(set(lease.tensors), set(tensors))
            for name, want in tensors.items():
                got = lease.tensors[name]
                self.assertEqual(got.dtype, want.dtype, name)
                self.assertEqual(got.shape, want.shape, name)
                self.assertEqual(support.tensor_bytes(got), support.tensor_bytes(want), name)

    @unittest.skipUnless(have("transformers"), "transformers is not installed")
    def test_a_transformers_model_from_the_daemon_computes_as_from_disk(self):
        import transformers
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=True)
        directory = os.path.join(self.root, "llama")
        LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="100KB")
        self.assertTrue(os.path.exists(os.path.join(directory, "model.safetensors.index.json")),
                        f"not sharded: {os.listdir(directory)}")
        client = self.serve({"llama": directory})

        reference = AutoModelForCausalLM.from_pretrained(directory).to(DEVICE).eval()
        model = weightd.transformers.from_pretrained("llama", AutoModelForCausalLM, device=DEVICE, client=client)
        self.assertIsInstance(model, LlamaForCausalLM)
        self.assertIs(model.lm_head.weight, model.model.embed_tokens.weight, "the tie was broken")
        self.assertEqual(model.model.embed_tokens.weight.data_ptr(),
                         model.weightd_lease.tensors["model.embed_tokens.weight"].data_ptr(), "not zero-copy")
        ids = torch.tensor([[1, 17, 42, 99, 3]], device=DEVICE)
        with torch.no_grad():
            want = reference(ids).logits
            got = model(ids).logits
        self.assertTrue(torch.equal(got, want), f"max diff {(got - want).abs().max().item()}")
        with torch.no_grad():
            want_gen = reference.generate(ids, max_new_tokens=8, do_sample=False)
            got_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        self.assertTrue(torch.equal(got_gen, want_gen), f"{got_gen} vs {want_gen}")
        # A concrete class works too.
        concrete = weightd.transformers.from_pretrained("llama", LlamaForCausalLM, device=DEVICE, client=client)
        with torch.no_grad():
            self.assertTrue(torch.equal(concrete(ids).logits, want))
        del transformers

    @unittest.skipUnless(have("timm") and have("safetensors"), "timm or safetensors is not installed")
    def test_a_timm_resnet50_from_the_daemon_computes_as_its_own_weights(self):
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        reference = timm.create_model("resnet50", pretrained=False).eval()
        directory = os.path.join(self.root, "resnet50")
        os.makedirs(directory)
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
                  os.path.join(directory, "model.safetensors"))
        reference = reference.to(DEVICE)
        client = self.serve({"resnet50": directory})
        with client.acquire("resnet50", device=DEVICE) as lease:
            model = timm.create_model("resnet50", pretrained=False).eval()
            report = weightd.bind(model, lease)
            self.assertEqual(report.missing + report.unexpected + report.mismatched, [])
            for name, p in model.state_dict().items():
                self.assertTrue(torch.equal(p, reference.state_dict()[name]), name)
            x = torch.randn(2, 3, 224, 224, device=DEVICE)
            with torch.no_grad():
                got, want = model(x), reference(x)
            if DEVICE == "cpu":
                self.assertTrue(torch.equal(got, want))
            else:
                # cuDNN may pick other convolution algorithms for other weight addresses, so two
                # instances with identical weights agree to rounding, not bit for bit.
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    unittest.main()
