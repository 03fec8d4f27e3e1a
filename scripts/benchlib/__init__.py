"""Reusable pieces of the benchmark scripts: classical baselines, a simulated user, report writing.

Not part of the engine (which may import only torch, numpy, SimpleITK and scipy): these use
scikit-fuzzy, slicer-core (VTK + vtkImageGrowCutSegment), matplotlib and tqdm.
"""
