"""The viewer's UI text, English and Simplified Chinese, and the choice between them.

One table per language, the same keys: the page HTML is written in the chosen language and
the table rides along as JSON for the script's own messages (dicomweb/viewer.py).
"""
from __future__ import annotations

LANGUAGES = {"en": "English", "zh-CN": "简体中文"}

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "pathpacs viewer", "home": "Studies", "t_slide": "Slide", "slide": "slide",
        "zoom_to": "Zoom to", "rotate_left": "Rotate left", "rotate_right": "Rotate right",
        "ruler": "Ruler", "area": "Area", "clear": "Clear", "t_label": "Label", "t_overview": "Overview",
        "t_metadata": "Slide information", "t_measurements": "Measurements", "t_annotations": "Annotations",
        "mark_label": "Label of new marks", "mark_point": "Point", "mark_box": "Rectangle",
        "mark_polygon": "Polygon", "mark_freehandpolygon": "Free hand", "mark_default": "mark",
        "save": "Save marks", "saved": "Marks saved.", "save_failed": "Saving failed: the archive answered",
        "help": "Keys: arrows pan, + and − zoom, 1–5 presets 1x–40x, [ and ] rotate, R ruler, A area, Esc stop drawing.",
        "loading": "Loading…", "ready": "Ready", "no_study": "No study given: open a study from the study list.",
        "no_series": "This study has no whole-slide image series.", "login": "Log in on the study list first.",
        "failed": "The archive answered", "none": "none",
        "link_expired": "This link has expired or was revoked.",
        "patient": "Patient", "patient_id": "Patient ID", "accession": "Accession", "specimen": "Specimen",
        "stain": "Stain", "scanner": "Scanner", "objective": "Objective", "spacing": "Pixel spacing",
        "size": "Size", "levels": "Levels", "length": "Length", "area_m": "Area",
        "t_compare": "Beside", "link": "Linked",
        "link_help": "Pan, zoom and rotation move both slides; unlink, align, link again to keep an offset",
        "draw_line": "Click two points to measure a length.",
        "draw_polygon": "Click the corners, double-click the last one to measure an area.",
        "t_consult": "Consultation", "c_question": "Question", "c_from": "From", "c_priority": "Priority",
        "c_state": "State", "c_opinion": "Opinion", "c_use_marks": "Send my marks as regions",
        "c_accept": "Accept", "c_decline": "Decline", "c_reason": "Reason for declining", "c_send": "Send opinion",
        "c_sent": "Opinion stored and sent back.", "c_declined": "Declined; the reason is sent back.",
        "c_accepted": "Accepted.", "c_need_text": "Write the opinion first.", "c_need_reason": "Give a reason.",
        "c_failed": "The archive answered",
    },
    "zh-CN": {
        "title": "pathpacs 阅片", "home": "检查列表", "t_slide": "切片", "slide": "切片",
        "zoom_to": "缩放到", "rotate_left": "向左旋转", "rotate_right": "向右旋转",
        "ruler": "标尺", "area": "面积", "clear": "清除", "t_label": "标签", "t_overview": "概览",
        "t_metadata": "切片信息", "t_measurements": "测量", "t_annotations": "标注",
        "mark_label": "新标记的名称", "mark_point": "点", "mark_box": "矩形",
        "mark_polygon": "多边形", "mark_freehandpolygon": "手绘", "mark_default": "标记",
        "save": "保存标记", "saved": "标记已保存。", "save_failed": "保存失败：归档服务器返回",
        "help": "按键：方向键平移，+ 和 − 缩放，1–5 为 1x–40x，[ 和 ] 旋转，R 标尺，A 面积，Esc 停止绘制。",
        "loading": "正在加载…", "ready": "就绪", "no_study": "未指定检查：请从检查列表打开。",
        "no_series": "该检查没有全切片图像序列。", "login": "请先在检查列表页登录。",
        "failed": "归档服务器返回", "none": "无",
        "link_expired": "此链接已过期或已被撤销。",
        "patient": "患者", "patient_id": "患者 ID", "accession": "检查号", "specimen": "标本",
        "stain": "染色", "scanner": "扫描仪", "objective": "物镜", "spacing": "像素间距",
        "size": "尺寸", "levels": "层级", "length": "长度", "area_m": "面积",
        "t_compare": "并排", "link": "联动",
        "link_help": "平移、缩放和旋转同时作用于两张切片；取消联动、对齐后再联动可保留偏移",
        "draw_line": "点击两点测量长度。",
        "draw_polygon": "依次点击各顶点，双击最后一点测量面积。",
        "t_consult": "会诊", "c_question": "会诊问题", "c_from": "申请方", "c_priority": "优先级",
        "c_state": "状态", "c_opinion": "会诊意见", "c_use_marks": "将我的标记作为区域发送",
        "c_accept": "接受", "c_decline": "拒绝", "c_reason": "拒绝原因", "c_send": "发送意见",
        "c_sent": "意见已保存并发回。", "c_declined": "已拒绝，原因已发回。",
        "c_accepted": "已接受。", "c_need_text": "请先填写会诊意见。", "c_need_reason": "请填写原因。",
        "c_failed": "归档服务器返回",
    },
}


def choose_language(explicit: str | None, accept_language: str) -> str:
    """`?lang=` when it names a language we have, else the best Accept-Language match
    (q-values honoured; any zh except zh-TW/zh-HK/zh-Hant reads Simplified), else English."""
    if explicit in TEXT:
        return explicit
    best, best_q = "en", 0.0
    for i, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        q -= i * 1e-6  # earlier wins a tie
        if tag == "en" or tag.startswith("en-"):
            lang = "en"
        elif tag == "zh" or (tag.startswith("zh-") and not tag.startswith(("zh-tw", "zh-hk", "zh-mo", "zh-hant"))):
            lang = "zh-CN"
        else:
            continue
        if q > best_q:
            best, best_q = lang, q
    return best
