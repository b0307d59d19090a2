"""The training half: the alpha schedule's updates and the Keras/TF1 hooks that call them."""
