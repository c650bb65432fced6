"""Mixed precision under a size budget (seed 001's ANNA, seed 003's hybrid precision): solvers and search."""
