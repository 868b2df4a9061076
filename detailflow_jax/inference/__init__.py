"""Using trained weights: loading them, sampling and decoding images, scoring reconstructions,
drawing pictures. The trainers (progress images), eval/ and the commands on top share it."""
