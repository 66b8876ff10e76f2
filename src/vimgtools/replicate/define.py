"""``--define``: the replica directory's clone defined as an inactive libvirt domain (never started).

The clone's definition is DEST/domain.xml under the name ``--as`` gives (default: the guest's),
marked as ours in its ``<metadata>``. A domain of that name (or UUID) that is not a clone of ours
is never touched: defining over it would repoint a real guest at the replicas. A clone of ours
is redefined in place (its UUID kept), so each night's run refreshes it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from vimgtools.errors import InvalidInput
from vimgtools.replicate.libvirt import LibvirtError

NS = "https://vimgtools.invalid/clone"  # the namespace of our mark in a clone's <metadata>
ET.register_namespace("vimg", NS)


def mark(xml: str, dest: str, generation: int, name: str) -> str:
    """The clone's XML: named ``name``, our mark in its metadata."""
    root = ET.fromstring(xml)
    el = root.find("name")
    if el is not None and el.text != name:
        el.text = name
        uuid = root.find("uuid")
        if uuid is not None:  # a clone under another name is another domain
            root.remove(uuid)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in meta.findall(f"{{{NS}}}clone"):
        meta.remove(old)
    ET.SubElement(meta, f"{{{NS}}}clone", dest=dest, generation=str(generation))
    return ET.tostring(root, "unicode")


def is_ours(xml: str) -> bool:
    meta = ET.fromstring(xml).find("metadata")
    return meta is not None and meta.find(f"{{{NS}}}clone") is not None


def check_can_define(conn: Any, lv: Any, name: str, uuid: str | None) -> None:
    """Refuse (exit 2, before anything is written) a name or UUID held by a domain that is not our clone."""
    for what, key in (("name", name), ("uuid", uuid)):
        if not key:
            continue
        try:
            dom = conn.lookupByName(key) if what == "name" else conn.lookupByUUIDString(key)
        except lv.libvirtError:
            continue
        if is_ours(dom.XMLDesc(0)):
            if dom.isActive():
                raise InvalidInput(
                    f"{dom.name()}: the clone is running at {conn.getURI()}: its disks are the replicas; "
                    "shut it off before replicating into them",
                    option="define",
                )
            continue
        raise InvalidInput(
            f"{dom.name()}: a domain that is not a clone of vimgtools already has this {what} at "
            f"{conn.getURI()}; give the clone another name with --as NAME",
            option="define",
        )


def define(conn: Any, lv: Any, domain_xml: str, dest: str, generation: int, name: str) -> str:
    """Define (or redefine) the clone from DEST's ``domain.xml`` (its text); returns its name. The
    caller checked ``check_can_define``."""
    xml = mark(domain_xml, dest, generation, name)
    root = ET.fromstring(xml)
    try:
        existing = conn.lookupByName(name)
    except lv.libvirtError:
        existing = None
    if existing is not None and root.find("uuid") is None:  # keep the clone's own UUID
        ET.SubElement(root, "uuid").text = existing.UUIDString()
        xml = ET.tostring(root, "unicode")
    try:
        dom = conn.defineXML(xml)
    except lv.libvirtError as e:
        raise LibvirtError(
            f"{name}: libvirt refused the clone's definition: {e.get_error_message()}"
        ) from None
    return str(dom.name())
