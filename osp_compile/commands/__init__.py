"""One module per CLI verb (see osp_compile.cli)."""
