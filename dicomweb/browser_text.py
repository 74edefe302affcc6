"""The study browser's words in English and Simplified Chinese, and which one a request gets.

The page is rendered in the language of the caller's Accept-Language (server-side, so the first
paint is already right); both tables go into the page too, so its language switch works
without another request and remembers the choice in localStorage.
"""
from __future__ import annotations

LANGUAGES = ("en", "zh-CN")

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "pathpacs studies",
        "logout": "log out",
        "login_intro": "This archive needs a credential: paste an API token "
                       "(pathpacs token create --role viewer) or an OIDC access token.",
        "login": "Log in",
        "login_oidc": "Log in with the hospital account",
        "name": "Patient name",
        "name_hint": "Wang* or 王*",
        "pid": "Patient ID",
        "accession": "Accession",
        "date_from": "Study date from",
        "date_to": "to",
        "modality": "Modality",
        "any": "any",
        "page_size": "Per page",
        "sort": "Order",
        "newest": "newest first",
        "oldest": "oldest first",
        "search": "Search",
        "clear": "Clear",
        "prev": "Previous",
        "next": "Next",
        "page": "Page {n}",
        "slides": "Slides",
        "patient": "Patient",
        "date": "Date",
        "description": "Description",
        "modalities": "Modalities",
        "count": "Slides",
        "stain": "Stain",
        "size": "Size",
        "storage": "Storage",
        "open": "open",
        "one_study": "1 study.",
        "n_studies": "{n} studies.",
        "more": "More on the next page.",
        "none": "No study matches.",
        "order_note": "Ordered by study date and time over all pages.",
        "answered": "The archive answered",
        "not_accepted": "That credential was not accepted:",
        "may_not_view": "Your role ({roles}) may not view images.",
        "ONLINE": "online",
        "NEARLINE": "nearline (recalled on access)",
        "OFFLINE": "offline",
        "idp_refused": "The identity provider refused the login",
        "state_mismatch": "The login answer did not match this page; try again.",
        "language": "Language",
        "inbox": "Consultation inbox", "inbox_received": "Received", "inbox_from": "From",
        "inbox_priority": "Priority", "inbox_question": "Question", "inbox_state": "State",
        "inbox_unknown": "unknown partner",
    },
    "zh-CN": {
        "title": "pathpacs 检查",
        "logout": "退出登录",
        "login_intro": "本存档需要凭据：粘贴 API 令牌（pathpacs token create --role viewer）或 OIDC 访问令牌。",
        "login": "登录",
        "login_oidc": "使用医院账号登录",
        "name": "患者姓名",
        "name_hint": "Wang* 或 王*",
        "pid": "患者 ID",
        "accession": "检查号",
        "date_from": "检查日期从",
        "date_to": "至",
        "modality": "模态",
        "any": "全部",
        "page_size": "每页",
        "sort": "排序",
        "newest": "最新在前",
        "oldest": "最早在前",
        "search": "搜索",
        "clear": "清除",
        "prev": "上一页",
        "next": "下一页",
        "page": "第 {n} 页",
        "slides": "切片",
        "patient": "患者",
        "date": "日期",
        "description": "描述",
        "modalities": "模态",
        "count": "切片数",
        "stain": "染色",
        "size": "大小",
        "storage": "存储",
        "open": "打开",
        "one_study": "1 个检查。",
        "n_studies": "{n} 个检查。",
        "more": "下一页还有更多。",
        "none": "没有匹配的检查。",
        "order_note": "按检查日期和时间对全部结果排序。",
        "answered": "存档返回",
        "not_accepted": "该凭据未被接受：",
        "may_not_view": "您的角色（{roles}）无权查看图像。",
        "ONLINE": "在线",
        "NEARLINE": "近线（访问时调回）",
        "OFFLINE": "离线",
        "idp_refused": "身份提供方拒绝了登录",
        "state_mismatch": "登录应答与本页不符，请重试。",
        "language": "语言",
        "inbox": "会诊收件箱", "inbox_received": "收到时间", "inbox_from": "申请方",
        "inbox_priority": "优先级", "inbox_question": "会诊问题", "inbox_state": "状态",
        "inbox_unknown": "未知合作方",
    },
}


def choose(accept_language: str | None) -> str:
    """The language of an Accept-Language header (RFC 9110 12.5.4: the highest q wins, ties
    in the order given); any Chinese tag gets Simplified Chinese, the one Chinese we have;
    English when nothing fits."""
    best, best_q = "en", 0.0
    for i, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            name, _, value = p.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        primary = tag.strip().lower().split("-")[0]
        lang = "zh-CN" if primary == "zh" else "en" if primary == "en" else None
        if lang is not None and q > best_q:
            best, best_q = lang, q
    return best
