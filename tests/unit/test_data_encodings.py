"""Encodings: legacy CJK and Cyrillic files are read as what they are, or refused naming the file — never
decoded into mojibake (Big5, EUC-KR, Shift-JIS and EUC-JP bytes all decode "fine" as GB18030)."""

import csv
import io

import pytest

from qflash.config import load_config
from qflash.data.readers import read_one
from qflash.errors import ConfigError, DataError

ZH_HANS = [
    ("最近总是头痛，晚上睡不好，白天也没有精神，需要去医院检查吗？", "长期头痛伴随失眠，建议先规律作息，减少咖啡和浓茶；如果头痛加重或伴有呕吐、视物模糊，请尽快到神经内科就诊。"),
    ("孩子发烧三十八度五，要不要吃退烧药？", "体温超过三十八度五可以按体重服用对乙酰氨基酚或布洛芬，同时多喝水；持续高烧超过三天要带孩子去儿科。"),
    ("高血压患者平时饮食要注意什么？", "少吃盐，每天不超过五克；多吃蔬菜水果，控制体重，戒烟限酒，并按医嘱坚持服药和测量血压。"),
    ("糖尿病人可以吃水果吗？", "血糖控制平稳时可以在两餐之间少量吃低糖水果，比如苹果、柚子，吃完后注意监测血糖。"),
    ("咳嗽两个星期还没好，是不是肺炎？", "咳嗽超过两周应当拍胸片并查血常规，排除肺炎、支气管炎或过敏性咳嗽，不要自行长期服用抗生素。"),
    ("胃经常反酸烧心怎么办？", "避免吃得过饱和睡前进食，少吃辛辣油腻；症状反复出现时建议做胃镜，在医生指导下使用抑酸药。"),
    ("晚上睡觉腿抽筋是缺钙吗？", "腿抽筋不一定是缺钙，也可能与受凉、疲劳或血液循环有关；睡前热敷和拉伸小腿通常有帮助。"),
    ("体检发现甲状腺结节，需要手术吗？", "大多数甲状腺结节是良性的，需要结合超声分级决定；一般先定期复查，必要时做细针穿刺。"),
    ("孕妇感冒了能吃药吗？", "孕期感冒首先多休息、多喝温水；需要用药时一定要咨询产科医生，不要自行服用复方感冒药。"),
    ("老人摔倒后腰疼得厉害，该怎么处理？", "先不要急着扶起，观察是否能活动四肢；腰疼明显时应平卧并尽快就医，拍片排除骨折。"),
]
ZH_HANT = [
    ("最近總是頭痛，晚上睡不好，白天也沒有精神，需要去醫院檢查嗎？", "長期頭痛伴隨失眠，建議先規律作息，減少咖啡和濃茶；如果頭痛加重或伴有嘔吐、視物模糊，請儘快到神經內科就診。"),
    ("孩子發燒三十八度五，要不要吃退燒藥？", "體溫超過三十八度五可以按體重服用退燒藥，同時多喝水；持續高燒超過三天要帶孩子去兒科。"),
    ("高血壓患者平時飲食要注意什麼？", "少吃鹽，每天不超過五克；多吃蔬菜水果，控制體重，戒菸限酒，並按醫囑堅持服藥和測量血壓。"),
    ("糖尿病人可以吃水果嗎？", "血糖控制平穩時可以在兩餐之間少量吃低糖水果，比如蘋果、柚子，吃完後注意監測血糖。"),
    ("咳嗽兩個星期還沒好，是不是肺炎？", "咳嗽超過兩週應當照胸部X光並驗血，排除肺炎、支氣管炎或過敏性咳嗽，不要自行長期服用抗生素。"),
    ("胃經常反酸燒心怎麼辦？", "避免吃得過飽和睡前進食，少吃辛辣油膩；症狀反覆出現時建議做胃鏡，在醫師指導下使用制酸劑。"),
    ("晚上睡覺腿抽筋是缺鈣嗎？", "腿抽筋不一定是缺鈣，也可能與受涼、疲勞或血液循環有關；睡前熱敷和拉伸小腿通常有幫助。"),
    ("體檢發現甲狀腺結節，需要手術嗎？", "大多數甲狀腺結節是良性的，需要結合超音波分級決定；一般先定期追蹤，必要時做細針穿刺。"),
    ("孕婦感冒了能吃藥嗎？", "孕期感冒首先多休息、多喝溫水；需要用藥時一定要諮詢婦產科醫師，不要自行服用綜合感冒藥。"),
    ("老人跌倒後腰痛得厲害，該怎麼處理？", "先不要急著扶起，觀察是否能活動四肢；腰痛明顯時應平躺並儘快就醫，照X光排除骨折。"),
]
KO = [
    ("요즘 계속 머리가 아프고 밤에 잠을 잘 못 자요. 병원에 가야 할까요?", "두통과 불면이 오래가면 먼저 규칙적으로 생활하고 커피를 줄이세요. 구토나 시야 흐림이 함께 있으면 바로 신경과 진료를 받으세요."),
    ("아이가 열이 삼십팔 도 오 부까지 올랐어요. 해열제를 먹여야 하나요?", "체온이 삼십팔 도 오 부를 넘으면 체중에 맞춰 해열제를 먹이고 물을 충분히 마시게 하세요. 사흘 넘게 열이 나면 소아과에 가세요."),
    ("고혈압 환자는 평소 식사에서 무엇을 조심해야 하나요?", "소금은 하루 오 그램 이하로 줄이고 채소와 과일을 많이 드세요. 체중을 관리하고 금연하며 약은 꾸준히 복용하세요."),
    ("당뇨병 환자도 과일을 먹어도 되나요?", "혈당이 안정적이라면 식사 사이에 사과나 자몽 같은 과일을 조금 드셔도 됩니다. 먹은 뒤에는 혈당을 확인하세요."),
    ("기침이 이 주째 낫지 않아요. 폐렴일까요?", "기침이 이 주 이상 계속되면 흉부 엑스레이와 혈액 검사를 받아 폐렴이나 기관지염을 확인하는 것이 좋습니다."),
    ("속쓰림과 신물이 자주 올라와요. 어떻게 해야 하나요?", "과식과 늦은 야식을 피하고 맵고 기름진 음식을 줄이세요. 증상이 반복되면 위내시경 검사를 받아 보세요."),
    ("밤에 자다가 다리에 쥐가 나는 건 칼슘 부족 때문인가요?", "꼭 칼슘 부족 때문만은 아니고 피로나 추위, 혈액 순환과도 관련이 있습니다. 자기 전에 종아리를 스트레칭해 보세요."),
    ("건강검진에서 갑상선 결절이 발견됐어요. 수술해야 하나요?", "대부분의 갑상선 결절은 양성입니다. 초음파 소견에 따라 정기적으로 추적 검사를 하고 필요하면 세침 검사를 합니다."),
    ("임신 중에 감기에 걸렸는데 약을 먹어도 될까요?", "충분히 쉬고 따뜻한 물을 많이 드세요. 약이 필요하면 반드시 산부인과 의사와 상의한 뒤에 복용하세요."),
    ("할머니가 넘어지신 뒤 허리가 많이 아프다고 하세요.", "급하게 일으키지 말고 팔다리를 움직일 수 있는지 먼저 보세요. 통증이 심하면 누운 채로 병원에 가서 골절 여부를 확인하세요."),
]
JA = [
    ("最近ずっと頭が痛くて、夜もよく眠れません。病院に行くべきでしょうか？", "頭痛と不眠が続く場合は、まず生活のリズムを整え、コーヒーを控えてください。吐き気や視界のかすみがあれば、すぐに神経内科を受診してください。"),
    ("子どもが三十八度五分の熱を出しました。解熱剤を飲ませてもいいですか？", "三十八度五分を超えたら体重に合わせて解熱剤を使い、水分をしっかりとらせてください。三日以上熱が続く場合は小児科へ行きましょう。"),
    ("高血圧の人は普段の食事で何に気をつければいいですか？", "塩分は一日五グラム以下を目安にし、野菜や果物を多くとりましょう。体重を管理し、禁煙して、薬は医師の指示どおりに続けてください。"),
    ("糖尿病でも果物を食べてもいいですか？", "血糖が安定していれば、食事の間にりんごやグレープフルーツを少量食べても構いません。食べた後は血糖値を確認してください。"),
    ("咳が二週間も治りません。肺炎でしょうか？", "二週間以上続く咳は、胸のレントゲンと血液検査で肺炎や気管支炎を確かめることをおすすめします。"),
    ("胸やけと胃酸の逆流がよく起こります。どうすればいいですか？", "食べ過ぎや寝る前の食事を避け、辛いものや脂っこいものを控えましょう。症状が繰り返すなら胃カメラ検査を受けてください。"),
    ("夜中に足がつるのはカルシウム不足のせいですか？", "必ずしもカルシウム不足とは限らず、疲れや冷え、血行とも関係があります。寝る前にふくらはぎを伸ばすと効果的です。"),
    ("健康診断で甲状腺にしこりが見つかりました。手術が必要ですか？", "甲状腺のしこりの多くは良性です。超音波の所見に応じて定期的に経過を見て、必要なら細い針で検査をします。"),
    ("妊娠中に風邪をひきました。薬を飲んでも大丈夫ですか？", "まずはよく休んで、温かい水分をとってください。薬が必要なときは、必ず産婦人科の医師に相談してから飲みましょう。"),
    ("祖母が転んでから腰をひどく痛がっています。", "急いで起こさず、手足が動かせるかを確認してください。痛みが強い場合は横になったまま病院で骨折がないか調べてもらいましょう。"),
]
RU = [
    ("В последнее время у меня постоянно болит голова, а ночью я плохо сплю. Нужно ли идти к врачу?", "При долгой головной боли и бессоннице сначала наладьте режим сна и уменьшите количество кофе. Если появились рвота или нечёткость зрения, срочно обратитесь к неврологу."),
    ("У ребёнка температура тридцать восемь и пять. Давать ли жаропонижающее?", "При температуре выше тридцати восьми и пяти можно дать жаропонижающее по весу ребёнка и больше поить его. Если жар держится дольше трёх дней, покажите ребёнка педиатру."),
    ("Что нужно учитывать в питании при гипертонии?", "Ограничьте соль до пяти граммов в день, ешьте больше овощей и фруктов, следите за весом, откажитесь от курения и регулярно принимайте лекарства."),
    ("Можно ли есть фрукты при диабете?", "Если сахар в крови стабилен, между приёмами пищи можно съесть немного яблок или грейпфрута, а затем проверить уровень сахара."),
    ("Кашель не проходит уже две недели. Это может быть пневмония?", "Кашель дольше двух недель — повод сделать рентген грудной клетки и анализ крови, чтобы исключить пневмонию или бронхит."),
    ("Меня часто мучает изжога. Что делать?", "Не переедайте и не ешьте перед сном, откажитесь от острой и жирной пищи. Если симптомы повторяются, пройдите гастроскопию."),
    ("Ночью сводит ноги судорогой. Это нехватка кальция?", "Не обязательно: судороги бывают из-за усталости, холода или плохого кровообращения. Помогает растяжка икроножных мышц перед сном."),
    ("На обследовании нашли узел в щитовидной железе. Нужна ли операция?", "Большинство узлов щитовидной железы доброкачественные. Обычно их наблюдают по данным УЗИ и при необходимости делают тонкоигольную биопсию."),
    ("Я беременна и простудилась. Можно ли мне принимать лекарства?", "Больше отдыхайте и пейте тёплую воду. Любые лекарства во время беременности принимайте только после консультации с акушером-гинекологом."),
    ("Бабушка упала, и теперь у неё сильно болит поясница.", "Не поднимайте её резко, сначала проверьте, может ли она двигать руками и ногами. При сильной боли вызовите врача, чтобы исключить перелом."),
]


def rows(pairs):
    """20 rows: each question and answer, then each joined with the next (a two-question turn)."""
    n = len(pairs)
    out = [{"id": str(i + 1), "question": q, "answer": a} for i, (q, a) in enumerate(pairs)]
    out += [{"id": str(n + i + 1), "question": pairs[i][0] + " " + pairs[(i + 1) % n][0],
             "answer": pairs[i][1] + " " + pairs[(i + 1) % n][1]} for i in range(n)]
    return out


def write_csv(path, records, encoding):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "question", "answer"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


# codec used to write the file -> (its text, the encoding qflash must report)
CORPUS = {
    "big5": (ZH_HANT, "big5 (cp950)"),
    "euc_kr": (KO, "euc-kr (cp949)"),
    "shift_jis": (JA, "shift_jis (cp932)"),
    "euc_jp": (JA, "euc-jp"),
    "cp1251": (RU, "cp1251"),
    "gb18030": (ZH_HANS, "gb18030"),
    "utf-16": (ZH_HANS, "utf-16"),  # Python's utf-16 codec writes a byte-order mark
}


@pytest.mark.parametrize("codec", list(CORPUS))
def test_every_encoding_of_the_corpus_reads_back_the_original_text(codec, tmp_path):
    pairs, reported = CORPUS[codec]
    original = rows(pairs)
    fr = read_one(write_csv(tmp_path / f"medical_{codec}.csv", original, codec))
    assert not fr.problems
    assert [r.data for r in fr.records] == original
    assert fr.encoding == reported


def test_a_file_with_too_little_text_to_tell_its_encoding_is_refused_naming_the_file(tmp_path):
    # Eight GB18030 characters decode cleanly as GB18030, Shift-JIS, EUC-JP, CP1251...: no way to know, so no guess.
    p = tmp_path / "short.csv"
    p.write_bytes("q\n孩子发烧三十八度\n".encode("gb18030"))
    with pytest.raises(DataError) as e:
        read_one(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: cannot tell the text encoding") and "too little non-ASCII text (16 bytes)" in msg
    assert "Candidates: gb18030, big5 (cp950)" in msg and "set data.encoding" in msg
    # data.encoding settles it.
    fr = read_one(p, "gb18030")
    assert fr.encoding == "gb18030 (data.encoding)" and fr.records[0].data == {"q": "孩子发烧三十八度"}


def test_text_that_two_encodings_read_about_as_well_is_refused(tmp_path):
    p = tmp_path / "one_row.csv"
    p.write_bytes(("q,a\n" + ",".join(JA[7]) + "\n").encode("shift_jis"))
    with pytest.raises(DataError, match=f"^{p}: cannot tell the text encoding: .* plausible text both as "
                                        r"shift_jis \(cp932\) and as euc-kr \(cp949\)"):
        read_one(p)
    assert read_one(p, "shift_jis").records[0].data == {"q": JA[7][0], "a": JA[7][1]}


def test_a_short_file_whose_high_bytes_stand_alone_is_never_read_as_another_script(tmp_path):
    # Six Big5 characters whose second bytes are ASCII letters: too little to detect, so it is read as UTF-8 with
    # invalid bytes, and every line holding them is a problem naming data.encoding - never mojibake.
    p = tmp_path / "tiny.csv"
    p.write_bytes("q\n孩子發燒三十\n".encode("big5"))
    fr = read_one(p)
    assert fr.encoding == "utf-8" and fr.records == []
    (problem,) = fr.problems
    assert problem.line == 2 and problem.kind == "invalid encoding" and "set data.encoding" in problem.reason
    assert read_one(p, "big5").records[0].data == {"q": "孩子發燒三十"}


def test_two_encodings_mixed_in_one_file_are_refused(tmp_path):
    p = tmp_path / "mixed.csv"
    p.write_bytes(write_csv(tmp_path / "a", rows(ZH_HANT), "big5").read_bytes()
                  + write_csv(tmp_path / "b", rows(ZH_HANS)[:5], "gb18030").read_bytes().split(b"\n", 1)[1])
    with pytest.raises(DataError, match=f"^{p}: cannot tell the text encoding: .*(no candidate encoding decodes|looks garbled)"):
        read_one(p)


def test_a_forced_encoding_reports_bytes_it_cannot_decode_by_line(tmp_path):
    p = tmp_path / "ru.csv"
    p.write_bytes("q,a\n".encode() + "Как дела?,Хорошо\n".encode("cp1251") + b"\x98\x98,x\n")
    fr = read_one(p, "cp1251")
    assert [r.data for r in fr.records] == [{"q": "Как дела?", "a": "Хорошо"}]
    (problem,) = fr.problems
    assert problem.line == 3 and problem.kind == "invalid encoding" and "byte 0x98 is not valid cp1251" in problem.reason


def test_data_encoding_must_name_a_codec():
    assert load_config(None, ["data.encoding=big5"]).data.encoding == "big5"
    with pytest.raises(ConfigError, match="data.encoding is not an encoding Python knows"):
        load_config(None, ["data.encoding=klingon"])
