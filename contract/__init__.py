"""What every stage shares and no stage owns: the model metadata contract, the image
preprocessing, the fixed dataset splits and the tables the tools print.

Torch-free (pydantic, numpy and PIL only), so the serving and load-test images carry this
package and not `training/`.
"""
