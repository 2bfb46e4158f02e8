"""Point Transformer V3 (v3m2, the Concerto/Sonata encoder) written in-project because Pointcept
and the Concerto package are not installable from PyPI: space-filling-curve serialisation
(:mod:`vggt4d.ptv3.serialization`), submanifold sparse convolution with torch gathers
(:mod:`vggt4d.ptv3.sparse_conv`) and the encoder itself, laid out so that released Concerto
checkpoints load unchanged and give the same features."""
