"""Data: data-set specs (`cifar10:DIR`, `imagefolder:DIR`, `npz:FILE`, `voc:DIR`, `coco:DIR`,
`shapes:N`, `synthetic:N`, ...) turned into transformed datasets and loaders (specs), the
dense-prediction sets and their joint transforms (dense), and the one data source the stages
take, built from a spec or from a user's own loaders (source)."""
