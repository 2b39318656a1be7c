"""Grounding markup -> boxes: phrases, quads, malformed input, pixel mapping, picture choice, exports."""

from __future__ import annotations

import json

import pytest

from producer.schema import parse_chat_request
from worker.engine.grounding import (
    GroundingBox,
    coco_annotations,
    coco_categories,
    ground_answer,
    label_studio_prediction,
    mentioned_picture,
    parse_grounding,
    referred_picture,
    score_boxes,
)

SEED_ANSWER = "<ref>女生</ref><box>(441,382),(733,811)</box>"


def _request(*user_texts: str, images_per_turn: int = 1):
    messages = []
    for i, text in enumerate(user_texts):
        content = [{"type": "image_url", "image_url": {"url": f"https://example.com/u{i}-{k}.jpg"}}
                   for k in range(images_per_turn)]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": text}]})
        if i < len(user_texts) - 1:
            messages.append({"role": "assistant", "content": "ok"})
    return parse_chat_request({"messages": messages})


def test_the_seed_answer_becomes_one_box_with_its_phrase() -> None:
    (box,) = parse_grounding(SEED_ANSWER)
    assert box.phrase == "女生" and box.kind == "box"
    assert box.points == ((441, 382), (733, 811))
    assert box.box == (441, 382, 733, 811)
    assert box.box_pixels is None


def test_pixels_follow_the_official_int_scaling() -> None:
    (box,) = parse_grounding(SEED_ANSWER, picture=1, image_size=(1024, 683))
    # int(441/1000*1024)=451, int(382/1000*683)=260, int(733/1000*1024)=750, int(811/1000*683)=553
    assert box.box_pixels == (451, 260, 750, 553)


def test_pixels_are_clamped_to_the_image() -> None:
    (box,) = parse_grounding("<box>(0,0),(1005,1200)</box>", image_size=(640, 480))
    assert box.box_pixels == (0, 0, 640, 480)


def test_several_boxes_after_one_ref_share_its_phrase() -> None:
    text = "<ref>狗</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>, <box>(9,9),(10,10)</box> and <box>(0,0),(1,1)</box>"
    assert [b.phrase for b in parse_grounding(text)] == ["狗"] * 4


def test_text_between_boxes_ends_the_phrase_and_a_lone_box_has_none() -> None:
    text = (
        "<box>(1,1),(2,2)</box> the dog is at <ref>dog</ref><box>(10,20),(30,40)</box>"
        " and the cat is here <box>(50,60),(70,80)</box><ref>cat</ref><box>(5,5),(6,6)</box>"
    )
    assert [(b.phrase, b.box[0]) for b in parse_grounding(text)] == [(None, 1), ("dog", 10), (None, 50), ("cat", 5)]


def test_quads_carry_four_points_and_their_bounding_box() -> None:
    (quad,) = parse_grounding("<ref>招牌</ref><quad>(10,20),(200,25),(198,80),(12,75)</quad>", image_size=(1000, 500))
    assert quad.kind == "quad" and quad.phrase == "招牌"
    assert quad.points == ((10, 20), (200, 25), (198, 80), (12, 75))
    assert quad.box == (10, 20, 200, 80)
    assert quad.points_pixels == ((10, 10), (200, 12), (198, 40), (12, 37))


@pytest.mark.parametrize(
    "text",
    [
        "<box>(1,2),(3,4)",  # unclosed
        "<box>(1,2)</box>",  # one corner
        "<box>(1,2),(3,4),(5,6)</box>",  # three corners
        "<box>(a,b),(c,d)</box>",
        "<box>(1.5,2),(3,4)</box>",
        "<box>1,2,3,4</box>",
        "<quad>(1,2),(3,4)</quad>",
        "<ref>x<box>(1,2),(3,4)</box>",  # ref never closed, box nested inside it
        "<box><box>(1,2),(3,4)</box></box>extra</box>",
        "</box>(1,2),(3,4)<box>",
        "<box>(99999999,2),(3,4)</box>",
        "",
    ],
)
def test_malformed_markup_is_ignored_never_raised(text: str) -> None:
    boxes = parse_grounding(text)
    assert all(len(b.points) in (2, 4) for b in boxes)
    assert len(boxes) <= 1


def test_nested_garbage_still_yields_the_well_formed_box() -> None:
    assert [b.points for b in parse_grounding("<ref>x<box>(1,2),(3,4)</box>")] == [((1, 2), (3, 4))]


def test_boxes_refer_to_the_latest_picture_by_default() -> None:
    req = _request("这是什么", "输出女生的检测框。", images_per_turn=1)
    assert referred_picture(req) == 2


@pytest.mark.parametrize(
    ("text", "picture"),
    [
        ("Box the dog in Picture 2.", 2),
        ("box the dog in picture #1", 1),
        ("框出图1中的狗", 1),
        ("框出图片二里的猫", 2),
        ("第一张图片里的人在哪？", 1),
        ("第3张", 3),
        ("第二十六张", None),  # only 3 pictures: falls back to the latest
        ("compare picture 1 and image 2, then box the cat in picture 1", 1),
        ("输出女生的检测框。", None),
    ],
)
def test_the_last_user_message_can_name_the_picture(text: str, picture: int | None) -> None:
    req = _request(text, images_per_turn=3)
    assert referred_picture(req) == (picture or 3)


def test_chinese_numerals_up_to_twenty_six_are_read() -> None:
    assert mentioned_picture("第二十六张", 26) == 26
    assert mentioned_picture("第十一张", 26) == 11
    assert mentioned_picture("图十", 26) == 10


def test_no_picture_means_no_pixels() -> None:
    req = parse_chat_request({"messages": [{"role": "user", "content": "框出猫"}]})
    (box,) = ground_answer(SEED_ANSWER, req, [])
    assert box.picture is None and box.box_pixels is None


def test_ground_answer_maps_onto_the_referred_pictures_size() -> None:
    req = _request("box the panda in picture 1", images_per_turn=2)
    (box,) = ground_answer("<ref>panda</ref><box>(500,500),(1000,1000)</box>", req, [(200, 100), (800, 600)])
    assert box.picture == 1 and box.box_pixels == (100, 50, 200, 100)


def test_to_dict_is_json_ready_and_round_trips() -> None:
    (box,) = parse_grounding(SEED_ANSWER, picture=1, image_size=(1024, 683))
    data = json.loads(json.dumps(box.to_dict()))
    assert data == {
        "phrase": "女生", "kind": "box", "picture": 1, "box": [441, 382, 733, 811],
        "points": [[441, 382], [733, 811]], "image_size": [1024, 683],
        "box_pixels": [451, 260, 750, 553], "points_pixels": [[451, 260], [750, 553]],
    }
    assert GroundingBox.from_dict(data) == box


def test_coco_annotations_use_xywh_pixels_and_phrase_categories() -> None:
    boxes = parse_grounding(
        "<ref>dog</ref><box>(100,100),(500,500)</box><box>(0,0),(10,10)</box> and a sign "
        "<quad>(0,0),(100,0),(100,100),(0,100)</quad>",
        picture=1, image_size=(200, 100),
    )
    categories = {"cat": 7}
    anns = coco_annotations(boxes, image_id=42, categories=categories, first_id=10)
    assert categories == {"cat": 7, "dog": 8, "object": 9}
    assert [a["id"] for a in anns] == [10, 11, 12]
    assert anns[0] == {"id": 10, "image_id": 42, "category_id": 8, "bbox": [20, 10, 80, 40], "area": 3200, "iscrowd": 0}
    assert anns[1]["category_id"] == 8 and anns[2]["category_id"] == 9 and anns[2]["segmentation"] == [[0, 0, 20, 0, 20, 10, 0, 10]]
    assert coco_categories(categories)[0] == {"id": 7, "name": "cat", "supercategory": "object"}


def test_coco_skips_boxes_without_an_image_size() -> None:
    assert coco_annotations(parse_grounding(SEED_ANSWER), image_id=1, categories={}) == []


def test_label_studio_prediction_uses_percent() -> None:
    boxes = parse_grounding(SEED_ANSWER + " text: <quad>(0,0),(100,0),(100,50),(0,50)</quad>", image_size=(1024, 683))
    pred = label_studio_prediction(boxes, model_version="v1")
    rect, poly = pred["result"]
    assert pred["model_version"] == "v1"
    assert rect["type"] == "rectanglelabels" and rect["original_width"] == 1024
    # the nearest doubles to the grid's tenths, as JSON writes them: 29.2, not 29.199999999999996
    assert (rect["value"]["x"], rect["value"]["width"]) == (44.1, 29.2)
    assert (rect["value"]["y"], rect["value"]["height"]) == (38.2, 42.9)
    assert rect["value"]["rectanglelabels"] == ["女生"]
    assert poly["type"] == "polygonlabels" and poly["value"]["points"][2] == [10.0, 5.0]
    assert poly["value"]["polygonlabels"] == ["object"]


def test_each_box_knows_where_its_markup_sits_in_the_answer() -> None:
    text = "<ref>a</ref><box>(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>"
    first, second = parse_grounding(text)
    assert text[slice(*first.span)] == "<box>(1,2),(3,4)</box>"
    assert text[slice(*second.span)] == "<box>(5,6),(7,8)</box>"


def test_a_box_scores_the_geometric_mean_probability_of_the_tokens_that_wrote_it() -> None:
    text = "<ref>a</ref><box>(1,2),(3,4)</box>"
    (box,) = parse_grounding(text)
    start, end = box.span
    # the phrase's tokens (sure), then the box's: three tokens, one of them in two minds
    tokens = [(0, 5, -0.01), (5, 6, -0.02), (6, 12, -0.01), (start, start + 5, 0.0),
              (start + 5, end - 6, -1.2), (end - 6, end, 0.0)]
    (scored,) = score_boxes([box], tokens)
    assert scored.score == pytest.approx(2.718281828 ** (-1.2 / 3), abs=1e-6)
    assert scored.to_dict()["score"] == scored.score and "score" not in box.to_dict()
    assert GroundingBox.from_dict(scored.to_dict()).score == scored.score
    assert score_boxes([box], [(0, 5, -0.01)])[0].score is None  # no token wrote it


def test_exports_carry_the_scores_when_known() -> None:
    (box,) = parse_grounding(SEED_ANSWER, picture=1, image_size=(1024, 683))
    (scored,) = score_boxes([box], [(0, len(SEED_ANSWER), -0.5)])
    [ann] = coco_annotations([scored], image_id=1, categories={})
    assert ann["score"] == scored.score
    pred = label_studio_prediction([scored])
    assert pred["result"][0]["score"] == scored.score and pred["score"] == scored.score
    assert "score" not in label_studio_prediction([box]) and "score" not in coco_annotations(
        [box], image_id=1, categories={})[0]
