"""The PASCAL VOC format (VOCdevkit layout): its 20 classes and its annotation XML.

Read by the ``voc`` dataset plugin and written by the miniature and shape-image writers, so the
three agree on the class order and the file structure.
"""

#: The 20 PASCAL VOC classes, in the order of the multi-hot targets.
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

VOC_XML = """<annotation>
  <folder>VOC{year}</folder><filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""
VOC_OBJECT = """  <object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{difficult}</difficult>
    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>
"""
