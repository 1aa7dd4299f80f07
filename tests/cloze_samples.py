"""Small built-in cloze question sets in every script of the study (Latin, Hangul, Han, Tibetan, Mongolian).

Item i of every file is the same question (parallel by position), as in the paper's files. They cover a
blank at the start, in the middle and at the end, a list-valued answer, and options of different lengths.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_QUESTIONS = {
    "en": [
        {
            "question": "The Korean people celebrate ___ in autumn.",
            "options": ["Chuseok", "Seollal", "Dano", "Hansik"],
            "answer": "Chuseok",
        },
        {
            "question": "___ are rice cakes eaten at Chuseok.",
            "options": ["Songpyeon", "Mooncakes", "Dumplings", "Noodles"],
            "answer": "Songpyeon",
        },
        {
            "question": "Han people eat mooncakes at the ____",
            "options": ["Mid-Autumn Festival", "Spring Festival", "Lantern Festival", "Qingming"],
            "answer": ["Mid-Autumn Festival"],
        },
        {
            "question": "Tibetans celebrate Losar, the ___ year.",
            "options": ["new", "old", "lunar new", "last"],
            "answer": ["new", "lunar new"],
        },
        {
            "question": "Mongolian people write in the ______ script.",
            "options": ["Mongolian", "Latin", "Cyrillic", "Tibetan"],
            "answer": "Mongolian",
        },
        {
            "question": 'Café naïve façade: 1234 — ___, digits; and "quotes"!',
            "options": ["punctuation", "letters", "marks", "signs"],
            "answer": "punctuation",
        },
    ],
    "ko": [
        {
            "question": "한국 사람들은 가을에 ___을 지낸다.",
            "options": ["추석", "설날", "단오", "한식"],
            "answer": "추석",
        },
        {"question": "___은 추석에 먹는 떡이다.", "options": ["송편", "월병", "만두", "국수"], "answer": "송편"},
        {
            "question": "한족은 ____에 월병을 먹는다.",
            "options": ["중추절", "춘절", "원소절", "청명"],
            "answer": "중추절",
        },
        {
            "question": "티베트 사람들은 ___ 로사르를 지낸다.",
            "options": ["새해", "옛해", "음력 새해", "지난해"],
            "answer": ["새해", "음력 새해"],
        },
        {
            "question": "몽골 사람들은 ______ 문자로 쓴다.",
            "options": ["몽골", "라틴", "키릴", "티베트"],
            "answer": "몽골",
        },
        {"question": "구두점과 숫자 1234: ___", "options": ["구두점", "글자", "기호", "표시"], "answer": "구두점"},
    ],
    "zh": [
        {"question": "韩国人在秋天过___。", "options": ["中秋", "春节", "端午", "寒食"], "answer": "中秋"},
        {"question": "___是中秋节吃的年糕。", "options": ["松饼", "月饼", "饺子", "面条"], "answer": "松饼"},
        {"question": "汉族在____吃月饼。", "options": ["中秋节", "春节", "元宵节", "清明节"], "answer": "中秋节"},
        {
            "question": "藏族庆祝___洛萨。",
            "options": ["新年", "旧年", "藏历新年", "去年"],
            "answer": ["新年", "藏历新年"],
        },
        {"question": "蒙古族用______文字书写。", "options": ["蒙古", "拉丁", "西里尔", "藏"], "answer": "蒙古"},
        {"question": "标点和数字1234：___", "options": ["标点", "字母", "符号", "记号"], "answer": "标点"},
    ],
    "bo": [
        {"question": "བོད་རིགས་ཀྱིས་___ལ་ཁ་ཟས་བཟོ།", "options": ["ལོ་གསར", "དབྱར་ཁ", "སྟོན་ཁ", "དགུན་ཁ"], "answer": "ལོ་གསར"},
        {"question": "___ནི་བོད་ཀྱི་ཟས་ཡིན།", "options": ["རྩམ་པ", "འབྲས", "ཐུག་པ", "མོག་མོག"], "answer": "རྩམ་པ"},
        {
            "question": "རྒྱ་རིགས་ཀྱིས་____ལ་ཟླ་གོར་ཟ།",
            "options": ["ཟླ་བ་བརྒྱད་པ", "ལོ་གསར", "ཆུ་ཚོད", "ཉིན་མོ"],
            "answer": "ཟླ་བ་བརྒྱད་པ",
        },
        {
            "question": "བོད་རིགས་ཀྱིས་___ལོ་གསར་སྲུང་།",
            "options": ["གསར་པ", "རྙིང་པ", "བོད་ཟླའི་གསར་པ", "སྔོན་མ"],
            "answer": ["གསར་པ", "བོད་ཟླའི་གསར་པ"],
        },
        {"question": "སོག་པོས་______ཡི་གེ་བྲིས།", "options": ["སོག", "ལ་ཏིན", "ཨུ་རུ་སུ", "བོད"], "answer": "སོག"},
        {"question": "ཚེག་དང་གྲངས་ཀ ༡༢༣༤ ___", "options": ["ཚེག", "ཡི་གེ", "རྟགས", "མཚོན"], "answer": "ཚེག"},
    ],
    "mn": [
        {
            "question": "ᠮᠣᠩᠭᠣᠯ ᠬᠦᠮᠦᠨ ___ ᠢ ᠲᠡᠮᠳᠡᠭᠯᠡᠨ᠎ᠡ᠃",
            "options": ["ᠨᠠᠭᠠᠳᠤᠮ", "ᠴᠠᠭᠠᠨ ᠰᠠᠷ᠎ᠠ", "ᠪᠠᠶᠠᠷ", "ᠤᠯᠠᠰ"],
            "answer": "ᠨᠠᠭᠠᠳᠤᠮ",
        },
        {"question": "___ ᠪᠣᠯ ᠮᠣᠩᠭᠣᠯ ᠢᠳᠡᠭᠡ᠃", "options": ["ᠪᠤᠤᠵᠠ", "ᠮᠠᠬᠠ", "ᠰᠦᠦ", "ᠴᠠᠢ"], "answer": "ᠪᠤᠤᠵᠠ"},
        {
            "question": "ᠬᠢᠲᠠᠳ ____ ᠳᠤ ᠰᠠᠷ᠎ᠠ ᠶᠢᠨ ᠲᠠᠯᠬ᠎ᠠ ᠢᠳᠡᠨ᠎ᠡ᠃",
            "options": ["ᠨᠠᠮᠤᠷ", "ᠬᠠᠪᠤᠷ", "ᠵᠤᠨ", "ᠡᠪᠦᠯ"],
            "answer": "ᠨᠠᠮᠤᠷ",
        },
        {
            "question": "ᠲᠦᠪᠡᠳ ___ ᠵᠢᠯ ᠢ ᠲᠡᠮᠳᠡᠭᠯᠡᠨ᠎ᠡ᠃",
            "options": ["ᠰᠢᠨ᠎ᠡ", "ᠬᠠᠭᠤᠴᠢᠨ", "ᠰᠠᠷ᠎ᠠ ᠶᠢᠨ ᠰᠢᠨ᠎ᠡ", "ᠡᠩᠭᠡᠷᠡᠭᠰᠡᠨ"],
            "answer": ["ᠰᠢᠨ᠎ᠡ", "ᠰᠠᠷ᠎ᠠ ᠶᠢᠨ ᠰᠢᠨ᠎ᠡ"],
        },
        {
            "question": "ᠮᠣᠩᠭᠣᠯ ______ ᠦᠰᠦᠭ ᠢᠶᠡᠷ ᠪᠢᠴᠢᠨ᠎ᠡ᠃",
            "options": ["ᠮᠣᠩᠭᠣᠯ", "ᠯᠠᠲᠢᠨ", "ᠺᠢᠷᠢᠯ", "ᠲᠦᠪᠡᠳ"],
            "answer": "ᠮᠣᠩᠭᠣᠯ",
        },
        {"question": "ᠴᠡᠭ ᠪᠠ ᠲᠣᠭ᠎ᠠ ᠑᠒᠓᠔ ___", "options": ["ᠴᠡᠭ", "ᠦᠰᠦᠭ", "ᠲᠡᠮᠳᠡᠭ", "ᠰᠢᠭ᠋"], "answer": "ᠴᠡᠭ"},
    ],
}

#: The script each sample language is written in (the parity test covers all of them).
SAMPLE_SCRIPTS = {"en": "Latin", "ko": "Hangul", "zh": "Han", "bo": "Tibetan", "mn": "Mongolian"}


def write_sample_questions(
    directory: Path, langs=("en", "ko", "zh", "bo", "mn"), base: str = "sample-culture"
) -> list[Path]:
    """Write ``<base>_<lang>.json`` for each language; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for lang in langs:
        path = directory / f"{base}_{lang}.json"
        path.write_text(json.dumps(SAMPLE_QUESTIONS[lang], ensure_ascii=False, indent=1), encoding="utf-8")
        paths.append(path)
    return paths
