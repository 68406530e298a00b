r"""The quick-start demo (configs/demo.py) with the DHMD variant: a dictionary of 64 atoms in
each space. Writes the dictionary activations beside the edges.

    python -m dmd_jax.main --config=configs/demo_dhmd.py --workdir=/tmp/dhmd_demo
"""

from configs import demo, mosi_dhmd


def get_config(alignment: str = 'aligned'):
  c = demo.get_config(alignment)
  c.model.dictionary = mosi_dhmd.dictionary()
  c.model.dictionary.num_atoms = 64    # the demo's 320 training samples use few atoms
  return c
