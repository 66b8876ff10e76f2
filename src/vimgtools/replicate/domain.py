"""``domain.xml`` of a replica directory: the guest's libvirt definition, its disks at the replicas.

What the DR host defines (``virsh define DEST/domain.xml``, or ``--define``) to start the clone.
Each disk becomes a plain file disk at its replica (``type='file'``, the replica's format, no
backing chain); everything else is the guest's own inactive definition. With a new name (``--as``)
the UUID is dropped, so that libvirt gives the clone its own.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

DOMAIN_XML = "domain.xml"


def clone_xml(xml: str, replicas: dict[str, tuple[Path, str]], *, name: str | None = None) -> str:
    """``xml`` with each disk whose target is in ``replicas`` (target -> (replica path, format)) there."""
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") not in replicas:
            continue
        path, fmt = replicas[target.get("dev", "")]
        disk.set("type", "file")
        for child in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(child)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu")
            disk.insert(0, driver)
        driver.set("type", fmt)
        source = ET.Element("source", file=str(path))
        disk.insert(list(disk).index(driver) + 1, source)
    if name is not None:
        el = root.find("name")
        if el is not None:
            el.text = name
        uuid = root.find("uuid")
        if uuid is not None:
            root.remove(uuid)
    return ET.tostring(root, "unicode") + "\n"
