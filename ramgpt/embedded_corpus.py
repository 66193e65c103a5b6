"""The generated part of the embedded corpus (``ramgpt/assets/corpus/generated_ja.txt``).

Templates filled from word lists with a fixed seed, so the same code always yields a byte-identical
file; :func:`ramgpt.tokenizer_train.build_embedded` writes it and retrains the embedded tokenizer
(``python tools/build_tokenizer.py --check`` compares a rebuild with the shipped files). Every slot is
filled from a list whose entries are grammatical in that slot, so any combination reads as natural
(if plain) Japanese. Season-bound words only meet their season. Pure data and functions; no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable

GENERATED = "generated_ja.txt"
SEED = 20240601


SEASONS: dict[str, dict[str, list]] = {
    "spring": {
        "months": [3, 4, 5],
        "weather": ["晴れ", "くもり", "雨", "晴れ時々くもり", "くもりのち晴れ", "小雨"],
        "scenes": [
            "川沿いの桜並木を歩くと、花びらが水面に浮かんでいた。",
            "公園の芝生で、子どもたちがしゃぼん玉を飛ばしていた。",
            "庭のチューリップが赤と黄色の花を開いた。",
            "風は少し冷たいが、日なたにいると汗ばむほどだった。",
            "田んぼに水が張られ、かえるの声が聞こえはじめた。",
            "ホームセンターで野菜の苗を買ってきた。",
            "道端のたんぽぽが綿毛になっていた。",
            "新しい制服を着た中学生が、少し大きな鞄を背負って歩いていた。",
        ],
        "foods": ["たけのこご飯", "春キャベツの炒め物", "菜の花のおひたし", "新じゃがの煮っころがし", "いちご"],
    },
    "summer": {
        "months": [6, 7, 8],
        "weather": ["晴れ", "快晴", "くもり", "夕立", "蒸し暑い晴れ", "雨"],
        "scenes": [
            "朝から蝉がにぎやかに鳴いていた。",
            "日差しが強く、日傘をさして歩いた。",
            "夕方、近くの神社で盆踊りの練習が始まっていた。",
            "冷たい麦茶を何杯も飲んだ。",
            "ベランダのゴーヤが大きく育ってきた。",
            "夜になっても気温が下がらず、寝苦しかった。",
            "入道雲が山の向こうに高くそびえていた。",
            "子どもたちが虫取り網を持って走っていった。",
        ],
        "foods": ["冷やし中華", "そうめん", "すいか", "枝豆", "うなぎの蒲焼き", "冷ややっこ"],
    },
    "autumn": {
        "months": [9, 10, 11],
        "weather": ["晴れ", "秋晴れ", "くもり", "雨", "晴れのち雨", "くもり時々晴れ"],
        "scenes": [
            "空が高く、うろこ雲が広がっていた。",
            "金木犀の香りがどこからか漂ってきた。",
            "近所の家の柿が色づいていた。",
            "夜、窓を開けると虫の声がよく聞こえた。",
            "山のほうの木々が少しずつ赤くなってきた。",
            "日が暮れるのがずいぶん早くなった。",
            "道に落ちたどんぐりを、子どもが夢中で拾っていた。",
            "稲刈りの終わった田んぼに、すずめが集まっていた。",
        ],
        "foods": ["さんまの塩焼き", "栗ご飯", "きのこの炊き込みご飯", "豚汁", "焼き芋", "梨"],
    },
    "winter": {
        "months": [12, 1, 2],
        "weather": ["晴れ", "くもり", "雪", "みぞれ", "晴れ時々雪", "冷たい雨"],
        "scenes": [
            "吐く息が白く、手袋をしていても指先が冷たかった。",
            "朝、水たまりに薄い氷が張っていた。",
            "駅のホームで温かいお茶を買った。",
            "夕方には空が赤く染まり、遠くの山が黒く浮かんで見えた。",
            "こたつに入ってみかんを食べた。",
            "窓の外で、細かい雪が風に舞っていた。",
            "商店街に正月飾りが並びはじめていた。",
            "北風が強く、自転車がなかなか前に進まなかった。",
        ],
        "foods": ["おでん", "寄せ鍋", "ぶり大根", "湯豆腐", "鍋焼きうどん", "シチュー"],
    },
}
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
WEEKDAYS = ["月", "火", "水", "木", "金", "土", "日"]
PLACES = [
    "駅前の本屋",
    "川沿いの公園",
    "近所のスーパー",
    "郵便局",
    "図書館",
    "商店街",
    "港の近くの市場",
    "丘の上の神社",
    "駅の向こうのパン屋",
    "町の美術館",
    "市役所",
    "古い喫茶店",
]
CHORES = ["部屋の掃除", "洗濯", "押し入れの片づけ", "窓ふき", "庭の草むしり", "たまっていた書類の整理", "靴みがき"]
WORK = [
    "頼まれていた資料づくり",
    "新しいプログラムの設計",
    "月末の報告書",
    "来週の会議の準備",
    "家計簿の計算",
    "ブログの記事の下書き",
    "学習データの整理",
    "テストの書き直し",
]
PEOPLE = [
    "友人の佐藤さん",
    "母",
    "姉",
    "同僚の木村さん",
    "近所のおばあさん",
    "大学時代の先輩",
    "弟",
    "いとこの春香",
    "父",
    "隣の山田さん",
]
TOPICS = [
    "最近読んだ本",
    "旅行の計画",
    "子どもの頃の思い出",
    "新しく始めた趣味",
    "仕事の悩み",
    "近所にできた店",
    "健康のこと",
    "昔の友人の近況",
    "畑の野菜",
    "週末の予定",
]
COMMON_FOODS = [
    "焼き魚と味噌汁",
    "親子丼",
    "野菜たっぷりのうどん",
    "肉じゃが",
    "ハンバーグ",
    "オムライス",
    "鮭のおにぎり",
    "麻婆豆腐",
    "カレーライス",
    "焼きそば",
    "ぎょうざ",
]
MORNINGS = [
    "朝は{place}まで歩いた。",
    "朝早く起きて、{place}まで自転車で出かけた。",
    "午前中は家で{chore}をした。",
    "朝から{work}に取りかかった。",
    "午前中に{place}へ行き、用事を済ませた。",
]
MEETINGS = [
    "{person}から電話があり、{topic}について長く話した。",
    "昼過ぎに{person}が訪ねてきて、{topic}の話で盛り上がった。",
    "{place}で偶然{person}に会い、少し立ち話をした。",
    "{person}に手紙を書いた。{topic}のことを少しだけ書き添えた。",
]
MEALS = [
    "昼ごはんは{food}だった。",
    "夕飯に{food}を作った。",
    "夜は家族で{food}を食べた。",
    "帰りに{food}を買って帰った。",
]
ENDINGS = [
    "静かで穏やかな一日だった。",
    "少し疲れたが、充実した一日だった。",
    "明日は早く起きようと思う。",
    "寝る前に少し本を読んだ。",
    "特に何もない一日だったが、それも悪くない。",
    "早めに布団に入った。",
    "明日もいい日になりますように。",
]


def diary(r: random.Random) -> str:
    season = SEASONS[r.choice(list(SEASONS))]
    month = r.choice(season["months"])
    day = r.randint(1, DAYS_IN_MONTH[month - 1])
    fill = {
        "place": r.choice(PLACES),
        "chore": r.choice(CHORES),
        "work": r.choice(WORK),
        "person": r.choice(PEOPLE),
        "topic": r.choice(TOPICS),
        "food": r.choice(season["foods"] + COMMON_FOODS),
    }
    body = [r.choice(MORNINGS), r.choice(season["scenes"]), r.choice(MEETINGS), r.choice(MEALS)]
    keep = sorted(r.sample(range(len(body)), k=r.randint(2, 4)))  # a subset, in the day's order
    body = [body[i].format(**fill) for i in keep]
    head = f"日記。{month}月{day}日（{r.choice(WEEKDAYS)}）、{r.choice(season['weather'])}。"
    return head + "".join(body) + r.choice(ENDINGS)


DISHES = {
    "炒め物": [
        ("野菜炒め", "豚肉", ["キャベツ", "にんじん", "ピーマン", "もやし"]),
        ("チンジャオロース", "牛肉", ["ピーマン", "たけのこ"]),
        ("ゴーヤチャンプルー", "豚肉", ["ゴーヤ", "豆腐", "卵"]),
        ("きのこのバター炒め", "ベーコン", ["しめじ", "まいたけ", "エリンギ"]),
        ("回鍋肉", "豚肉", ["キャベツ", "ねぎ", "ピーマン"]),
    ],
    "煮物": [
        ("肉じゃが", "牛肉", ["じゃがいも", "玉ねぎ", "にんじん"]),
        ("筑前煮", "鶏肉", ["れんこん", "ごぼう", "にんじん", "しいたけ"]),
        ("かぼちゃの煮物", None, ["かぼちゃ"]),
        ("大根と鶏手羽の煮物", "鶏手羽", ["大根", "しょうが"]),
        ("ひじきの煮物", "油揚げ", ["ひじき", "にんじん", "大豆"]),
    ],
    "汁物": [
        ("豚汁", "豚肉", ["大根", "にんじん", "ごぼう", "里芋"]),
        ("けんちん汁", None, ["大根", "にんじん", "豆腐", "里芋"]),
        ("かき玉汁", None, ["卵", "ねぎ"]),
        ("ミネストローネ", "ベーコン", ["トマト", "玉ねぎ", "セロリ", "じゃがいも"]),
    ],
}
CUTS = ["一口大", "細切り", "薄切り", "乱切り", "さいの目"]
SEASONINGS = {
    "炒め物": ["しょうゆとみりん", "塩とこしょう", "オイスターソース", "みそとしょうゆ"],
    "煮物": ["しょうゆと砂糖とみりん", "しょうゆとみりん"],
    "汁物": ["みそ", "塩としょうゆ", "塩とこしょう"],
}
TIPS = [
    "具を入れすぎないのがコツだ。",
    "前の日に作っておくと味がしみておいしい。",
    "ご飯のおかずにもお酒のつまみにもなる。",
    "お弁当のおかずにも向いている。",
    "辛いのが好きなら、唐辛子を加えてもいい。",
    "残ったら翌朝のおかずにするとよい。",
    "多めに作って冷凍しておくと便利だ。",
]


def recipe(r: random.Random) -> str:
    kind = r.choice(list(DISHES))
    dish, meat, vegs = r.choice(DISHES[kind])
    ings = ([meat] if meat else []) + vegs
    seasoning = r.choice(SEASONINGS[kind])
    people = r.choice(["二人分", "三人分", "四人分"])
    head = f"{dish}の作り方（{people}）。材料は{'、'.join(ings)}。"
    if kind == "炒め物":
        steps = (
            f"{'と'.join(vegs[:2])}を{r.choice(CUTS)}に切っておく。フライパンを強火で熱して油をひき、"
            f"{meat}から炒める。色が変わったら残りの材料を加えてさっと炒め合わせ、{seasoning}で味をととのえる。"
        )
    elif kind == "煮物":
        first = f"{meat}と" if meat else ""
        steps = (
            f"{first}{'、'.join(vegs)}を食べやすい大きさに切り、鍋に入れる。だしを注いで火にかけ、"
            f"煮立ったらあくを取り、{seasoning}を加える。落としぶたをして{r.choice([10, 15, 20, 25])}分ほど弱火で煮る。"
        )
    else:
        steps = (
            f"鍋にだしを温め、{'、'.join(ings)}を入れて煮る。具に火が通ったら{seasoning}で味をつける。"
            f"仕上げに{r.choice(['刻んだねぎ', '七味唐辛子', '三つ葉', 'こしょう'])}を散らす。"
        )
    tips = TIPS + (
        ["仕上げにごま油を少し垂らすと香りがよくなる。", "火を通しすぎないのがコツだ。"] if kind == "炒め物" else []
    )
    return head + steps + r.choice(tips)


REGIONS = [
    "北海道",
    "東北地方",
    "関東地方",
    "東海地方",
    "北陸地方",
    "近畿地方",
    "中国地方",
    "四国地方",
    "九州北部",
    "九州南部",
    "沖縄",
]
FORECAST = {
    "spring": (
        [14, 24],
        [4, 12],
        ["晴れ", "晴れ時々くもり", "くもり", "くもりのち雨"],
        ["朝晩は冷えこむので、上着を一枚お持ちください。", "花粉が多く飛ぶ見込みです。", "洗濯日和となりそうです。"],
    ),
    "summer": (
        [28, 36],
        [21, 27],
        ["晴れ", "晴れ時々くもり", "くもり一時雨", "雨"],
        [
            "熱中症に注意し、こまめに水分をとってください。",
            "急な雷雨にご注意ください。",
            "紫外線が強いので、日傘や帽子があると安心です。",
        ],
    ),
    "autumn": (
        [16, 27],
        [8, 18],
        ["晴れ", "くもり", "くもり時々晴れ", "雨のちくもり"],
        [
            "空気が乾燥しています。火の取り扱いに注意してください。",
            "朝晩の気温差が大きくなります。",
            "行楽日和となりそうです。",
        ],
    ),
    "winter": (
        [0, 12],
        [-8, 4],
        ["晴れ", "くもり", "雪", "くもり時々雪"],
        ["路面の凍結に注意してください。", "暖かくしてお出かけください。", "乾燥に注意し、加湿を心がけてください。"],
    ),
}
CHANGES = [
    "午後は雲が広がり、夕方には雨の降るところがあるでしょう",
    "次第に晴れ間が広がるでしょう",
    "北よりの風がやや強く吹く見込みです",
    "一日を通して雲の多い天気となるでしょう",
    "夜には天気が回復に向かう見込みです",
]


def forecast(r: random.Random) -> str:
    key = r.choice(list(FORECAST))
    hi_range, lo_range, skies, advice = FORECAST[key]
    month = r.choice(SEASONS[key]["months"])
    region = r.choice(REGIONS)
    if key == "winter" and region == "沖縄":
        hi_range, lo_range, skies = [17, 22], [12, 16], ["晴れ", "くもり", "くもり時々晴れ"]
    hi = r.randint(*hi_range)
    lo = min(r.randint(*lo_range), hi - 3)
    return (
        f"{month}月{r.randint(1, DAYS_IN_MONTH[month - 1])}日の天気です。{region}は{r.choice(skies)}でしょう。"
        f"{r.choice(CHANGES)}。最高気温は{hi}度、最低気温は{lo}度の予想です。{r.choice(advice)}"
    )


LINES = ["青葉線", "みなと線", "北山線", "さくら線", "川原鉄道", "東西線", "緑ヶ丘線"]
STATIONS = [
    "中央",
    "港町",
    "緑が丘",
    "桜台",
    "南町",
    "北浜",
    "東公園",
    "西大橋",
    "本町",
    "川原",
    "山下",
    "新田",
    "旭町",
    "若葉台",
    "大学前",
    "市役所前",
    "競技場前",
    "温泉口",
]
TRAIN_KINDS = ["各駅停車", "快速", "急行", "特急", "区間快速"]
MANNERS = [
    "車内では携帯電話をマナーモードに設定し、通話はお控えください。",
    "ドア付近の方は、降りる方のために一度ホームへお降りください。",
    "お忘れ物のないよう、ご注意ください。",
    "優先席付近では、混雑時には携帯電話の電源をお切りください。",
    "電車とホームの間が広く空いているところがあります。足元にご注意ください。",
]
DELAY_REASONS = ["信号の確認", "線路内への立ち入り", "強風", "車両の点検", "大雨", "踏切の安全確認"]


def announcement(r: random.Random) -> str:
    line = r.choice(LINES)
    dest, nxt = r.sample(STATIONS, 2)
    if r.random() < 0.3:
        minutes = r.choice([5, 10, 15, 20, 30])
        return (
            f"お客様にお知らせいたします。ただいま{line}は、{nxt}駅付近での{r.choice(DELAY_REASONS)}のため、"
            f"上下線とも約{minutes}分の遅れが出ております。お急ぎのところ大変ご迷惑をおかけいたします。"
            "運転再開まで、今しばらくお待ちください。"
        )
    transfer = ""
    if r.random() < 0.6:
        other = r.choice([x for x in LINES if x != line])
        transfer = f"{other}はお乗り換えです。"
    return (
        f"本日も{line}をご利用いただきまして、ありがとうございます。この電車は{r.choice(TRAIN_KINDS)}、"
        f"{dest}行きです。次は{nxt}、{nxt}です。お出口は{r.choice(['右', '左'])}側です。{transfer}{r.choice(MANNERS)}"
    )


NAMES = ["ゆうき", "さくら", "けんた", "はなこ", "たろう", "みさき", "そうた", "あおい"]
ITEMS = [
    ("りんご", "個"),
    ("みかん", "個"),
    ("えんぴつ", "本"),
    ("シール", "枚"),
    ("ノート", "冊"),
    ("あめ", "個"),
    ("折り紙", "枚"),
]
GIVERS = ["お母さん", "お兄さん", "先生", "友だち", "おじいさん", "となりのおばさん"]


def clock(minutes: int) -> str:
    h, m = divmod(minutes, 60)
    return f"{h}時" if m == 0 else f"{h}時{m}分"


def arithmetic(r: random.Random) -> str:
    name = r.choice(NAMES)
    item, counter = r.choice(ITEMS)
    a, b = r.randint(2, 30), r.randint(1, 20)
    c = r.randint(1, a + b - 1)
    if r.random() < 0.5:
        return (
            f"{name}さんは{item}を{a}{counter}持っています。{r.choice(GIVERS)}から{b}{counter}もらうと、"
            f"全部で{a + b}{counter}になります。そのうち{c}{counter}を友だちにあげると、残りは{a + b - c}{counter}です。"
        )
    start = r.randint(6, 9) * 60 + r.choice([0, 5, 10, 15, 20, 30, 40, 45])
    walk = r.choice([8, 12, 15, 20, 25])
    wait = r.randint(3, 9)
    return (
        f"{name}さんは{clock(start)}に家を出て、駅まで{walk}分歩きます。駅に着くのは{clock(start + walk)}です。"
        f"電車は{clock(start + walk + wait)}に出るので、{wait}分前に着くことになります。"
    )


TOWNS = ["霧ヶ丘町", "川島町", "浜野町", "高森町", "石田町", "松原町", "沢井町", "みずほ町"]
GEOS = {
    "山あい": "朝夕には谷に霧が立ちこめる",
    "海沿い": "朝には漁港から威勢のよい声が聞こえてくる",
    "大きな川の河口近く": "かつては川をのぼる舟の荷揚げ場としてにぎわった",
    "盆地の真ん中": "夏は暑く冬は冷えこむが、果物がよく育つ",
    "湖のほとり": "冬になると湖に白鳥が渡ってくる",
    "峠のふもと": "昔は峠を越える旅人のための宿場だった",
}
FEATURES = [
    "駅前から続く坂道には、古い商店が並んでいる",
    "町の中心には、江戸時代から続く酒蔵がある",
    "春になると、川沿いの桜並木に人が集まる",
    "町のあちこちに小さな湧き水がある",
    "丘の上の展望台からは、町全体が見渡せる",
    "古い木造の小学校が、今は資料館として使われている",
]
SPECIALTIES = ["手打ちそば", "干物", "梨", "地酒", "焼き物", "こんにゃく", "草もち", "みかん"]
EVENTS = [
    ("夏", "花火大会"),
    ("秋", "秋祭り"),
    ("毎週日曜", "朝市"),
    ("お盆", "灯籠流し"),
    ("冬", "雪まつり"),
    ("秋", "紅葉まつり"),
]


def town(r: random.Random) -> str:
    geo = r.choice(list(GEOS))
    f1, f2 = GEOS[geo], r.choice(FEATURES)
    when, event = r.choice(EVENTS)
    return (
        f"{r.choice(TOWNS)}は、{geo}にある小さな町だ。{f1}。{f2}。{r.choice(SPECIALTIES)}が名物で、"
        f"{when}には{event}が開かれ、町の外からも多くの人が訪れる。人口は{r.randint(2, 40) * 500}人ほどである。"
    )


MONTHS_EN = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
EN_WEATHER = ["Sunny", "Cloudy", "Light rain", "Windy and cold", "Bright but chilly", "Warm and humid"]
EN_MORNING = [
    "Walked to the station early",
    "Worked on the report all morning",
    "Cleaned the kitchen",
    "Went to the market for vegetables",
    "Read in the garden",
]
EN_AFTERNOON = [
    "Met an old friend for coffee",
    "Fixed the bicycle brakes",
    "Wrote two letters",
    "Took a long walk along the river",
    "Tried a new bread recipe",
]
EN_EVENING = [
    "Made soup for dinner",
    "Watched the rain from the window",
    "Went to bed early",
    "Called my sister",
    "Finished the book I started last week",
]


def english_diary(r: random.Random) -> str:
    month = r.randrange(12)
    return (
        f"Diary, {MONTHS_EN[month]} {r.randint(1, DAYS_IN_MONTH[month])}. {r.choice(EN_WEATHER)}. "
        f"{r.choice(EN_MORNING)}. {r.choice(EN_AFTERNOON)}. {r.choice(EN_EVENING)}."
    )


GENERATORS: list[tuple[Callable[[random.Random], str], int]] = [
    (diary, 60),
    (recipe, 25),
    (forecast, 30),
    (announcement, 30),
    (arithmetic, 25),
    (town, 20),
    (english_diary, 20),
]


def generate_lines(seed: int = SEED) -> list[str]:
    """The templated documents, deduplicated, in a fixed order."""
    r = random.Random(seed)
    seen: dict[str, None] = {}
    for make, count in GENERATORS:
        made = 0
        for _ in range(count * 20):
            line = make(r)
            if line not in seen:
                seen[line] = None
                made += 1
            if made == count:
                break
    return list(seen)

