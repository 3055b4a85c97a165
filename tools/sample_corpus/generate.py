"""Generate the LlamaThink sample corpus (prose.jsonl and conversations.jsonl).

All text is original to this project: a mix of the hand-written documents in
``handwritten.py`` and documents assembled from the templates and word lists
below.  The output is deterministic for a given seed, so the committed files can
be regenerated with::

    python tools/sample_corpus/generate.py

This script is only needed to rebuild the data (it writes into ``llamathink/sample_data/``); it is not part of
the installed package.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from handwritten import ESSAYS, FABLES, HOWTOS  # noqa: E402

SEED = 20260107
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "llamathink", "sample_data")

# ---------------------------------------------------------------------------
# word lists
# ---------------------------------------------------------------------------

FIRST_NAMES = [
    "Mara",
    "Omar",
    "Lena",
    "Tobias",
    "Priya",
    "Jonah",
    "Ines",
    "Felix",
    "Amara",
    "Hugo",
    "Sofia",
    "Ravi",
    "Nora",
    "Elias",
    "Yara",
    "Milo",
    "Hana",
    "Theo",
    "Zara",
    "Caleb",
    "Leila",
    "Oscar",
    "Mei",
    "Ruben",
    "Anya",
    "Samir",
    "Greta",
    "Dev",
    "Iris",
    "Luca",
    "Nadia",
    "Arlo",
    "Esme",
    "Kofi",
    "Rosa",
    "Finn",
    "Aiko",
    "Bruno",
    "Clara",
    "Tariq",
]
PRONOUNS = {
    "she": ("she", "her", "her", "herself"),
    "he": ("he", "him", "his", "himself"),
}
NAME_GENDER = {n: ("she" if i % 2 == 0 else "he") for i, n in enumerate(FIRST_NAMES)}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
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
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]

ANIMALS = [
    dict(
        name="red fox",
        kind="mammal",
        home="woodland edges, farmland and even the outskirts of towns",
        food="mice, voles, rabbits, beetles and berries",
        size="about the size of a small dog",
        trait="its long bushy tail, which it wraps around itself like a blanket on cold nights",
        extra="Foxes are mostly active at dusk and during the night.",
    ),
    dict(
        name="honeybee",
        kind="insect",
        home="hives and hollow trees, in colonies of many thousands",
        food="nectar and pollen from flowers",
        size="a little shorter than a fingernail",
        trait="the waggle dance, a little run that tells other bees where to find food",
        extra="A single worker bee makes only a tiny amount of honey in her whole life.",
    ),
    dict(
        name="sea otter",
        kind="mammal",
        home="cold coastal waters of the northern Pacific",
        food="sea urchins, crabs, clams and mussels",
        size="about as long as a child is tall",
        trait="its habit of floating on its back and cracking shells open with a stone",
        extra="Its fur is thicker than that of almost any other animal, and it keeps the otter warm without a layer of fat.",
    ),
    dict(
        name="barn owl",
        kind="bird",
        home="open farmland and grassland, nesting in old barns and hollow trees",
        food="mice, voles and shrews",
        size="about the size of a large pigeon",
        trait="its pale heart-shaped face, which gathers sound like a dish",
        extra="It can catch prey in complete darkness by hearing alone.",
    ),
    dict(
        name="green sea turtle",
        kind="reptile",
        home="warm seas around the world",
        food="seagrass and algae once it is grown",
        size="longer than a bath tub when fully grown",
        trait="its long journeys back to the beach where it hatched in order to lay eggs",
        extra="The temperature of the sand helps decide whether the hatchlings will be male or female.",
    ),
    dict(
        name="emperor penguin",
        kind="bird",
        home="the sea ice around Antarctica",
        food="fish, krill and squid",
        size="taller than most other penguins, about as tall as a young child",
        trait="the way the males hold the egg on their feet through the winter",
        extra="Huddling together in large groups helps them survive the bitter wind.",
    ),
    dict(
        name="African elephant",
        kind="mammal",
        home="savannas and forests in Africa",
        food="grasses, leaves, bark and fruit",
        size="the largest animal that lives on land",
        trait="its trunk, which can pick up a single nut or pull down a branch",
        extra="Elephants live in family groups that are led by an older female.",
    ),
    dict(
        name="octopus",
        kind="invertebrate",
        home="the sea floor, among rocks and reefs",
        food="crabs, shrimp and small fish",
        size="anything from smaller than a hand to larger than a person, depending on the species",
        trait="its ability to change the color and texture of its skin in a moment",
        extra="It has eight arms lined with suckers that can taste what they touch.",
    ),
    dict(
        name="monarch butterfly",
        kind="insect",
        home="meadows and fields across North America",
        food="milkweed leaves as a caterpillar and flower nectar as an adult",
        size="about as wide as a palm with its wings open",
        trait="its long autumn migration south to forests in the mountains of Mexico",
        extra="The milkweed it eats as a caterpillar makes it taste bad to birds.",
    ),
    dict(
        name="common frog",
        kind="amphibian",
        home="ponds, ditches and damp meadows in Europe",
        food="insects, slugs, snails and worms",
        size="small enough to sit in the palm of your hand",
        trait="the large clumps of spawn it lays in ponds early in spring",
        extra="Its tadpoles live in water and breathe with gills before they grow legs.",
    ),
    dict(
        name="hedgehog",
        kind="mammal",
        home="gardens, hedgerows and the edges of woods",
        food="beetles, worms, caterpillars and slugs",
        size="about as big as a grapefruit when rolled up",
        trait="the way it curls into a tight ball of spines when it is frightened",
        extra="In cold regions it hibernates through the winter in a nest of leaves.",
    ),
    dict(
        name="blue whale",
        kind="mammal",
        home="the open oceans of the world",
        food="krill, which it filters from the water in huge mouthfuls",
        size="longer than two buses parked end to end",
        trait="its enormous size, greater than any dinosaur we know of",
        extra="Its low calls can travel for hundreds of miles through the water.",
    ),
    dict(
        name="hummingbird",
        kind="bird",
        home="the Americas, from gardens to mountain forests",
        food="flower nectar and tiny insects",
        size="among the smallest birds in the world",
        trait="its ability to hover in one place and even fly backwards",
        extra="Its wings beat so fast that they make a soft humming sound.",
    ),
    dict(
        name="beaver",
        kind="mammal",
        home="rivers, streams and lakes in North America and Europe",
        food="bark, twigs and water plants",
        size="about as heavy as a medium dog",
        trait="the dams it builds from branches and mud",
        extra="The ponds behind beaver dams become homes for fish, frogs and birds.",
    ),
    dict(
        name="Atlantic salmon",
        kind="fish",
        home="rivers and the northern Atlantic Ocean",
        food="insects when young and small fish at sea",
        size="about as long as an arm when fully grown",
        trait="its journey back up the very river where it hatched",
        extra="Salmon can leap up small waterfalls on their way upstream.",
    ),
    dict(
        name="earthworm",
        kind="invertebrate",
        home="damp soil almost everywhere",
        food="dead leaves and other decaying plant matter",
        size="usually about as long as a finger",
        trait="the way it mixes and loosens the soil as it burrows",
        extra="It has no eyes, but it can sense light through its skin.",
    ),
    dict(
        name="dromedary camel",
        kind="mammal",
        home="hot deserts in North Africa and the Middle East",
        food="dry grasses, thorny plants and leaves",
        size="taller than a person at the shoulder",
        trait="its single hump, which stores fat rather than water",
        extra="It can go for many days without drinking and then drink a great deal at once.",
    ),
    dict(
        name="giant panda",
        kind="mammal",
        home="cool mountain forests in central China",
        food="bamboo, almost all of the time",
        size="about as heavy as an adult person or a little more",
        trait="its black and white coat and its calm, slow way of eating",
        extra="Because bamboo is not very nourishing, a panda spends much of the day eating.",
    ),
    dict(
        name="common pipistrelle",
        kind="mammal",
        home="woods, gardens and towns across Europe",
        food="midges, mosquitoes and other small flying insects",
        size="small enough to fit in a matchbox",
        trait="its use of echoes from its own high calls to find insects in the dark",
        extra="A single pipistrelle can eat thousands of tiny insects in one night.",
    ),
    dict(
        name="leafcutter ant",
        kind="insect",
        home="tropical forests in Central and South America",
        food="a fungus that the ants grow themselves",
        size="smaller than a grain of rice for most workers",
        trait="the long lines of workers carrying pieces of leaf like little green sails",
        extra="The leaves are not eaten; they are used to feed the fungus gardens underground.",
    ),
    dict(
        name="garden snail",
        kind="invertebrate",
        home="gardens, hedges and damp walls",
        food="leaves, flowers and fruit",
        size="about as big as a walnut",
        trait="the spiral shell it carries on its back",
        extra="It glides along on a layer of slime that protects its soft body.",
    ),
    dict(
        name="carrion crow",
        kind="bird",
        home="farmland, coasts, parks and cities",
        food="almost anything, from seeds and insects to scraps",
        size="a little larger than a pigeon",
        trait="its cleverness at solving puzzles to reach food",
        extra="Crows seem to remember faces, especially those of people who have bothered them.",
    ),
    dict(
        name="bottlenose dolphin",
        kind="mammal",
        home="warm and temperate seas",
        food="fish and squid",
        size="about twice as long as a grown person is tall",
        trait="its clicks and whistles, which it uses to talk to other dolphins and to find food",
        extra="Dolphins breathe air through a blowhole on the top of their heads.",
    ),
    dict(
        name="Galapagos giant tortoise",
        kind="reptile",
        home="the Galapagos Islands in the Pacific",
        food="grasses, leaves and cactus pads",
        size="heavier than two grown people",
        trait="its very long life, which can last more than a hundred years",
        extra="It can survive a long time without food or water.",
    ),
    dict(
        name="red squirrel",
        kind="mammal",
        home="pine and mixed forests",
        food="seeds from pine cones, nuts, fungi and berries",
        size="about as long as a ruler, not counting the tail",
        trait="its tufted ears and the stores of food it hides for winter",
        extra="Some of the seeds it buries and forgets grow into new trees.",
    ),
    dict(
        name="moon jellyfish",
        kind="invertebrate",
        home="coastal waters in many oceans",
        food="plankton and tiny sea creatures",
        size="about as wide as a dinner plate",
        trait="its see-through bell, with four pale rings in the middle",
        extra="It has no brain and no heart, and its body is mostly water.",
    ),
    dict(
        name="red kangaroo",
        kind="mammal",
        home="the dry plains of Australia",
        food="grasses and other plants",
        size="taller than many adults when standing upright",
        trait="the pouch in which the mother carries her young, called a joey",
        extra="It moves by hopping on its strong back legs, using its tail for balance.",
    ),
    dict(
        name="mute swan",
        kind="bird",
        home="lakes, rivers and quiet coasts",
        food="water plants, which it reaches by dipping its long neck",
        size="one of the heaviest flying birds",
        trait="its graceful curved neck and orange beak",
        extra="Pairs often stay together for many years.",
    ),
    dict(
        name="great white shark",
        kind="fish",
        home="cool coastal waters in many parts of the world",
        food="fish, seals and sea lions",
        size="longer than a small boat",
        trait="its sharp sense of smell and rows of replaceable teeth",
        extra="Its skeleton is made of cartilage, the same bendy material that is in our ears.",
    ),
    dict(
        name="seven-spot ladybird",
        kind="insect",
        home="gardens, meadows and hedgerows",
        food="aphids and other small insects",
        size="about as big as a pea",
        trait="its bright red wing cases with seven black spots",
        extra="Gardeners welcome ladybirds because they eat aphids that damage plants.",
    ),
]

PLANETS = [
    (
        "Mercury",
        1,
        "a small rocky world",
        "the smallest planet and the one closest to the Sun",
        "it has no moons and almost no air, so its days are scorching and its nights are freezing",
    ),
    (
        "Venus",
        2,
        "a rocky planet wrapped in thick clouds",
        "the hottest planet, even though it is not the closest to the Sun",
        "its thick air traps heat like a blanket, and it has no moons",
    ),
    (
        "Earth",
        3,
        "a rocky planet with oceans of liquid water",
        "the only planet we know of that has life",
        "it has one large moon, which steadies its tilt and drives the tides",
    ),
    (
        "Mars",
        4,
        "a cold, dusty, rocky planet",
        "known as the red planet",
        "its reddish color comes from iron-rich dust, and it has two small moons",
    ),
    (
        "Jupiter",
        5,
        "a giant planet made mostly of gas",
        "the largest planet in our solar system",
        "it has a huge storm called the Great Red Spot and a large family of moons",
    ),
    (
        "Saturn",
        6,
        "a gas giant",
        "famous for its bright, wide rings",
        "its rings are made of countless pieces of ice and rock",
    ),
    (
        "Uranus",
        7,
        "an ice giant",
        "the planet that spins tipped over on its side",
        "it looks pale blue-green because of methane in its air",
    ),
    (
        "Neptune",
        8,
        "an ice giant",
        "the planet farthest from the Sun",
        "it has the fastest winds measured on any planet",
    ),
]

DISHES = [
    dict(
        name="lentil soup",
        serves="four",
        ingredients=[
            "1 onion",
            "2 carrots",
            "2 cloves of garlic",
            "1 cup of red lentils",
            "1 tin of chopped tomatoes",
            "4 cups of vegetable stock",
            "a pinch of cumin",
            "salt and pepper",
        ],
        steps=[
            "Chop the onion and carrots and crush the garlic.",
            "Soften them in a little oil in a large pan for about five minutes.",
            "Stir in the cumin, then add the lentils, tomatoes and stock.",
            "Simmer for twenty-five minutes, until the lentils are soft.",
            "Season with salt and pepper, and blend if you like a smooth soup.",
        ],
        note="This soup tastes even better the next day.",
    ),
    dict(
        name="pancakes",
        serves="two",
        ingredients=["1 cup of flour", "1 egg", "1 cup of milk", "a pinch of salt", "butter for the pan"],
        steps=[
            "Whisk the flour, egg, milk and salt into a smooth batter.",
            "Let the batter rest for ten minutes.",
            "Heat a little butter in a frying pan.",
            "Pour in a small ladle of batter and tilt the pan to spread it.",
            "Cook until the edges lift, then flip and cook the other side.",
        ],
        note="Serve them with lemon and sugar, or with fruit and yogurt.",
    ),
    dict(
        name="tomato salad",
        serves="four",
        ingredients=[
            "6 ripe tomatoes",
            "half a red onion",
            "a handful of basil leaves",
            "2 tablespoons of olive oil",
            "1 teaspoon of vinegar",
            "salt",
        ],
        steps=[
            "Slice the tomatoes and lay them on a plate.",
            "Slice the onion very thinly and scatter it over the top.",
            "Tear the basil leaves and add them.",
            "Mix the oil and vinegar and pour it over.",
            "Sprinkle with salt just before serving.",
        ],
        note="The salad is best when the tomatoes are at room temperature.",
    ),
    dict(
        name="flatbread",
        serves="six",
        ingredients=[
            "2 cups of flour",
            "1 teaspoon of salt",
            "3 tablespoons of yogurt",
            "about half a cup of warm water",
        ],
        steps=[
            "Mix the flour and salt in a bowl.",
            "Add the yogurt and enough water to make a soft dough.",
            "Knead for a few minutes and leave it to rest under a cloth.",
            "Divide into six balls and roll each one out thinly.",
            "Cook each bread in a hot dry pan for a minute on each side.",
        ],
        note="Brush them with melted butter while they are still warm.",
    ),
    dict(
        name="vegetable fried rice",
        serves="three",
        ingredients=[
            "3 cups of cooked rice, preferably from the day before",
            "1 cup of peas",
            "1 carrot",
            "2 eggs",
            "2 spring onions",
            "2 tablespoons of soy sauce",
            "oil for frying",
        ],
        steps=[
            "Dice the carrot and slice the spring onions.",
            "Heat the oil in a wide pan and fry the carrot and peas for three minutes.",
            "Push the vegetables aside, crack in the eggs and scramble them.",
            "Add the rice and stir everything together over a high heat.",
            "Add the soy sauce and spring onions and cook for two more minutes.",
        ],
        note="Cold rice works better than fresh rice because it is drier.",
    ),
    dict(
        name="apple crumble",
        serves="six",
        ingredients=[
            "5 apples",
            "2 tablespoons of sugar for the fruit",
            "1 cup of flour",
            "half a cup of oats",
            "half a cup of butter",
            "half a cup of brown sugar",
            "a pinch of cinnamon",
        ],
        steps=[
            "Peel, core and slice the apples and place them in a baking dish with the sugar and cinnamon.",
            "Rub the butter into the flour until it looks like breadcrumbs.",
            "Stir in the oats and brown sugar.",
            "Spread the crumble over the apples.",
            "Bake in a moderate oven for about forty minutes, until golden.",
        ],
        note="Serve it warm with custard or cream.",
    ),
    dict(
        name="hummus",
        serves="four",
        ingredients=[
            "1 tin of chickpeas",
            "2 tablespoons of tahini",
            "1 lemon",
            "1 clove of garlic",
            "3 tablespoons of olive oil",
            "salt",
        ],
        steps=[
            "Drain the chickpeas, keeping a little of the liquid.",
            "Put everything except the oil into a blender with the juice of the lemon.",
            "Blend, adding the oil slowly, until smooth.",
            "Add a spoonful of the chickpea liquid if it is too thick.",
            "Taste and add more salt or lemon if needed.",
        ],
        note="A drizzle of oil and a sprinkle of paprika make it look inviting.",
    ),
    dict(
        name="porridge",
        serves="one",
        ingredients=["half a cup of oats", "1 cup of milk or water", "a pinch of salt", "honey or fruit to serve"],
        steps=[
            "Put the oats, milk and salt in a small pan.",
            "Bring to a gentle simmer, stirring often.",
            "Cook for about five minutes until thick and creamy.",
            "Pour into a bowl and top with honey or fruit.",
        ],
        note="On cold mornings it is hard to think of a better breakfast.",
    ),
    dict(
        name="baked potatoes",
        serves="four",
        ingredients=["4 large potatoes", "a little oil", "salt", "butter, cheese or beans to fill"],
        steps=[
            "Scrub the potatoes and prick them with a fork.",
            "Rub them with oil and salt.",
            "Bake in a hot oven for about an hour, until the skins are crisp.",
            "Cut a cross in the top of each one and squeeze gently to open it.",
            "Add your favorite filling.",
        ],
        note="The skin is the best part, so do not rush the baking.",
    ),
    dict(
        name="vegetable curry",
        serves="four",
        ingredients=[
            "1 onion",
            "2 cloves of garlic",
            "a thumb of ginger",
            "2 tablespoons of curry paste",
            "1 tin of coconut milk",
            "1 sweet potato",
            "1 cup of spinach",
            "1 tin of chickpeas",
        ],
        steps=[
            "Fry the chopped onion, garlic and ginger until soft.",
            "Stir in the curry paste and cook for one minute.",
            "Add the diced sweet potato, chickpeas and coconut milk.",
            "Simmer for twenty minutes until the sweet potato is tender.",
            "Stir in the spinach until it wilts.",
        ],
        note="Serve with rice or warm flatbread.",
    ),
]

WEATHER = [
    ("sunny", "The sun was out from early morning and the sky was a clean, pale blue."),
    ("rainy", "It rained steadily from breakfast until the middle of the afternoon."),
    ("windy", "A strong wind rattled the windows and sent leaves racing down the street."),
    ("foggy", "A thick fog hid the end of the street until almost noon."),
    ("snowy", "Snow fell in big soft flakes and settled on the rooftops."),
    ("cloudy", "The clouds hung low and grey all day, but it never quite rained."),
    ("stormy", "In the evening a storm rolled in, with thunder far away over the hills."),
    ("frosty", "There was frost on the grass and on the car windows when I woke up."),
    ("warm", "It was warm enough to sit outside without a coat."),
    ("drizzly", "A fine drizzle came and went, never heavy enough for an umbrella."),
]
ACTIVITIES = [
    "walked to the bakery for bread",
    "fixed the squeaky kitchen door",
    "wrote three letters",
    "repotted the herbs on the windowsill",
    "went swimming at the public pool",
    "cleaned out the shed",
    "read two chapters of my library book",
    "helped a neighbor carry a sofa up the stairs",
    "baked a batch of oat biscuits",
    "took the bus into town to buy new shoes",
    "practised the piano for an hour",
    "sorted through a box of old photographs",
    "cycled along the canal path",
    "planted a row of beans",
    "made soup for the week",
    "walked the dog twice around the park",
    "painted the garden fence",
    "visited my grandmother",
    "tidied my desk at last",
    "went to the museum to see the new exhibition",
]
FEELINGS = [
    "I felt tired but pleased with the day.",
    "It was a calm, ordinary day, and I liked it.",
    "By evening I was ready for an early night.",
    "I felt more cheerful than I had all week.",
    "I kept thinking about the letter I still have not answered.",
    "Somehow the day went by very quickly.",
    "I was glad to get home and put the kettle on.",
    "It felt good to finish something for once.",
]

TOWN_PARTS_A = [
    "Brin",
    "Ash",
    "Cal",
    "Dun",
    "Els",
    "Fen",
    "Gar",
    "Hol",
    "Kel",
    "Lin",
    "Mor",
    "Nor",
    "Pel",
    "Quin",
    "Ros",
    "Sel",
    "Tam",
    "Ul",
    "Vel",
    "Wren",
]
TOWN_PARTS_B = ["dle", "ford", "wick", "by", "mere", "stead", "ham", "ton", "brook", "moor", "well", "field"]
TOWN_GEO = [
    "on a bend of a slow brown river",
    "at the foot of a steep chalk hill",
    "beside a wide, shallow lake",
    "where two valleys meet",
    "on a rocky stretch of coast",
    "in the middle of flat, open farmland",
    "on the edge of an old forest",
    "at a crossing point of two ancient tracks",
]
TOWN_ORIGIN = [
    "a handful of farms",
    "a fishing hamlet",
    "a ferry crossing",
    "a small market",
    "a mill and a few cottages",
    "a resting place for travelers on the road north",
]
TOWN_GROWTH = [
    "the wool trade",
    "a new bridge over the river",
    "the discovery of good clay for bricks",
    "a weekly cattle market",
    "the arrival of the railway",
    "a busy harbor",
    "a paper mill powered by the river",
    "the quarrying of building stone",
]
TOWN_EVENTS = [
    "a great flood washed away the lower street",
    "a fire destroyed most of the wooden houses",
    "a harsh winter froze the river for six weeks",
    "a new school was built beside the church",
    "the old bridge was replaced with one of stone",
    "the market hall was rebuilt with a clock tower",
    "a sickness spread through the town and many families left",
]
TOWN_TODAY = [
    "a quiet place with a good bakery and a small museum",
    "a busy little town popular with walkers",
    "known for its summer music festival",
    "home to a few thousand people and one stubborn goat",
    "a commuter town, though the old market still runs on Thursdays",
    "best known for its apple orchards",
]

STORY_GOALS = [
    (
        "learn to play the violin",
        "the first notes sounded like a cat complaining",
        "played a simple tune at the village hall",
    ),
    (
        "grow the biggest pumpkin in the valley",
        "slugs ate half the seedlings in the first week",
        "wheeled a pumpkin the size of an armchair to the autumn fair",
    ),
    (
        "swim across the lake",
        "the cold water took the breath out of",
        "reached the far shore and lay laughing on the pebbles",
    ),
    (
        "build a small wooden boat",
        "the first hull leaked like a sieve",
        "rowed the little boat across the harbor on a still morning",
    ),
    (
        "bake bread as good as a grandmother's",
        "the first loaves came out as hard as bricks",
        "handed a warm loaf to the neighbors, who asked for the recipe",
    ),
    (
        "climb the highest hill in the county",
        "a storm turned everyone back halfway on the first try",
        "stood at the top and watched the clouds roll below",
    ),
    (
        "finish writing a book of stories",
        "the pages sat untouched in a drawer for a whole winter",
        "held the first printed copy and read the opening line aloud",
    ),
    (
        "teach an old dog to fetch",
        "the dog simply lay down and watched the stick fly",
        "threw the ball and watched the old dog trot back with it, looking rather proud",
    ),
    (
        "open a small shop selling secondhand books",
        "the first month brought only three customers",
        "saw a queue outside the door on a rainy Saturday",
    ),
    (
        "find the source of the river",
        "the map turned out to be wrong about almost everything",
        "knelt beside a trickle of cold water bubbling out of the moss",
    ),
]
STORY_HELPERS = [
    "an old neighbor",
    "a patient teacher",
    "a younger cousin",
    "a retired sailor",
    "a friend from school",
    "the woman who ran the corner shop",
    "a kind librarian",
]
STORY_TIMES = [
    "spring morning",
    "wet autumn afternoon",
    "long summer evening",
    "cold winter night",
    "quiet Sunday",
    "busy market day",
]

LETTER_REASONS = [
    ("thank you for the birthday present", "The book you sent has barely left my hands since it arrived."),
    (
        "sorry I missed your visit",
        "I was stuck at work far later than I planned, and by the time I got home you had gone.",
    ),
    ("news from the new house", "We have finally unpacked the last box, although we still cannot find the kettle lid."),
    (
        "an invitation to the summer party",
        "We are planning a small party in the garden on the last Saturday of the month.",
    ),
    ("an update on the garden", "The beans have climbed right over the fence and into next door's garden."),
    ("advice about the trip", "If you take the early train, you will have the whole afternoon by the sea."),
]

ITEMS = [
    "apples",
    "pencils",
    "marbles",
    "stickers",
    "books",
    "eggs",
    "shells",
    "stamps",
    "cookies",
    "coins",
    "buttons",
    "plums",
    "cards",
    "balloons",
    "pebbles",
]

HOW_GUIDES_TOPICS = [
    "study for an exam",
    "save money each month",
    "keep a houseplant alive",
    "get ready for a long walk",
    "sleep better",
    "learn new words in another language",
]
GUIDE_TIPS = {
    "study for an exam": [
        "Start early and study a little every day rather than all at once.",
        "Test yourself instead of only rereading your notes.",
        "Explain a topic out loud as if you were teaching a friend.",
        "Take short breaks to rest your eyes and stretch.",
        "Sleep well the night before, because tired minds forget.",
    ],
    "save money each month": [
        "Write down everything you spend for a month to see where it goes.",
        "Set aside a fixed amount as soon as you are paid.",
        "Wait a day before buying anything you did not plan to buy.",
        "Cook at home more often and carry a bottle of water.",
        "Keep a small amount for treats so that saving does not feel like a punishment.",
    ],
    "keep a houseplant alive": [
        "Find out whether your plant likes bright light or shade.",
        "Water only when the top of the soil feels dry.",
        "Make sure the pot has a hole in the bottom so water can drain.",
        "Wipe dust off the leaves now and then.",
        "Turn the pot a little each week so the plant grows evenly.",
    ],
    "get ready for a long walk": [
        "Wear shoes that you have already worn in.",
        "Check the weather and pack a light waterproof jacket.",
        "Carry water and a snack, even for a short trip.",
        "Tell someone where you are going and when you expect to be back.",
        "Take a map and know how to read it.",
    ],
    "sleep better": [
        "Go to bed and get up at about the same time every day.",
        "Keep the bedroom cool, dark and quiet.",
        "Put screens away for an hour before bed.",
        "Avoid coffee and tea late in the day.",
        "If you cannot sleep, get up and read quietly until you feel drowsy.",
    ],
    "learn new words in another language": [
        "Learn a few words each day and review them often.",
        "Write each new word in a sentence of your own.",
        "Label things around your home with their names.",
        "Listen to songs and simple stories in the language.",
        "Do not worry about mistakes; they are part of learning.",
    ],
}


# ---------------------------------------------------------------------------
# prose generators
# ---------------------------------------------------------------------------


def cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def gen_animal(rng: random.Random, a: dict) -> str:
    n = a["name"]
    title_forms = [f"The {n}", f"All about the {n}", f"Animal notes: the {n}", f"Meet the {n}"]
    intro_forms = [
        f"The {n} is {article(a['kind'])} {a['kind']} that lives in {a['home']}.",
        f"You can find the {n} in {a['home']}.  It is {article(a['kind'])} {a['kind']}.",
        f"{cap(article(a['kind']))} {a['kind']} of {a['home']}, the {n} is a familiar sight to those who know where to look.",
    ]
    food_forms = [
        f"It feeds on {a['food']}.",
        f"Its diet is made up mostly of {a['food']}.",
        f"When it is hungry, the {n} looks for {a['food']}.",
    ]
    size_forms = [f"In size it is {a['size']}.", f"A grown {n} is {a['size']}.", f"It is {a['size']}."]
    trait_forms = [
        f"It is best known for {a['trait']}.",
        f"People who study it are often most interested in {a['trait']}.",
        f"One of its most remarkable features is {a['trait']}.",
    ]
    body = [rng.choice(intro_forms), rng.choice(food_forms), rng.choice(size_forms)]
    second = [rng.choice(trait_forms), a["extra"]]
    if rng.random() < 0.5:
        rng.shuffle(second)
    style = rng.randrange(3)
    if style == 0:
        return rng.choice(title_forms) + "\n\n" + " ".join(body) + "\n\n" + " ".join(second)
    if style == 1:
        return (
            rng.choice(title_forms) + "\n\n" + f"Type of animal: {a['kind']}\nHome: {a['home']}\n"
            f"Food: {a['food']}\nSize: {a['size']}\n\n" + " ".join(second)
        )
    qs = (
        f"Q: Where does the {n} live?\nA: In {a['home']}.\n\n"
        f"Q: What does it eat?\nA: {cap(a['food'])}.\n\n"
        f"Q: What is special about it?\nA: {cap(a['trait'])}.  {a['extra']}"
    )
    return f"Questions and answers about the {n}\n\n" + qs


def gen_planet(rng: random.Random, p: tuple) -> str:
    name, order, kind, fame, detail = p
    ordinal = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"][order - 1]
    forms = [
        f"{name} is the {ordinal} planet from the Sun.  It is {kind}, and it is {fame}.  {cap(detail)}.",
        f"Counting outward from the Sun, {name} comes {ordinal}.  Astronomers describe it as {kind}.  "
        f"It is {fame}, and {detail}.",
        f"If you travel out from the Sun, the {ordinal} planet you reach is {name}, {kind}.  "
        f"{name} is {fame}.  {cap(detail)}.",
    ]
    return rng.choice(forms)


def gen_solar_system(rng: random.Random) -> str:
    chosen = sorted(rng.sample(PLANETS, rng.randint(3, 5)), key=lambda p: p[1])
    head = rng.choice(
        ["A tour of the planets", "Notes on the solar system", "The planets, one by one", "Our neighbors in space"]
    )
    intro = rng.choice(
        [
            "Eight planets travel around the Sun.  The four closest are small and rocky, and the four farthest are giants.",
            "The Sun holds eight planets in their orbits.  Each one is different from the others.",
            "Our solar system has eight planets, along with moons, comets and countless smaller rocks.",
        ]
    )
    return head + "\n\n" + intro + "\n\n" + "\n\n".join(gen_planet(rng, p) for p in chosen)


def gen_recipe(rng: random.Random, d: dict) -> str:
    title = rng.choice(
        [
            f"How to make {d['name']}",
            f"Recipe: {d['name']}",
            f"Simple {d['name']}",
            f"{cap(d['name'])} for {d['serves']}",
        ]
    )
    intro = rng.choice(
        [
            f"This recipe serves {d['serves']}.",
            f"Here is an easy way to make {d['name']} for {d['serves']} people.",
            f"{cap(d['name'])} is simple to make and needs no special equipment.",
        ]
    )
    ing = "\n".join("- " + i for i in d["ingredients"])
    if rng.random() < 0.5:
        steps = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(d["steps"]))
        return f"{title}\n\n{intro}\n\nYou will need:\n{ing}\n\nMethod:\n{steps}\n\n{d['note']}"
    words = ["First", "Next", "Then", "After that", "Finally"]
    parts = []
    for i, s in enumerate(d["steps"]):
        w = words[min(i, 3)] if i < len(d["steps"]) - 1 else words[4]
        parts.append(f"{w}, {s[0].lower() + s[1:]}")
    return (
        f"{title}\n\n{intro}  You will need {', '.join(d['ingredients'][:-1])} and {d['ingredients'][-1]}.\n\n"
        + " ".join(parts)
        + "  "
        + d["note"]
    )


def gen_diary(rng: random.Random) -> str:
    day = rng.choice(DAYS)
    date = f"{rng.randint(1, 28)} {rng.choice(MONTHS)}"
    w, wsent = rng.choice(WEATHER)
    acts = rng.sample(ACTIVITIES, 3)
    friend = rng.choice(FIRST_NAMES)
    lines = [wsent]
    lines.append(
        rng.choice(
            [
                f"In the morning I {acts[0]}.",
                f"First thing, I {acts[0]}.",
                f"Before lunch I {acts[0]}.",
            ]
        )
    )
    lines.append(
        rng.choice(
            [
                f"After lunch I {acts[1]}, and later I {acts[2]}.",
                f"In the afternoon I {acts[1]}.  Then I {acts[2]}.",
                f"Later on, I {acts[1]} and, because the {w} weather would not change, I {acts[2]} too.",
            ]
        )
    )
    lines.append(
        rng.choice(
            [
                f"{friend} phoned in the evening and we talked for almost an hour.",
                f"I met {friend} by chance at the bus stop, and we agreed to have lunch next week.",
                f"{friend} sent a message asking whether I wanted to go walking on {rng.choice(DAYS)}.",
                "Nobody called, which was fine by me.",
            ]
        )
    )
    lines.append(rng.choice(FEELINGS))
    sep = "\n" if rng.random() < 0.3 else " "
    return f"{day}, {date}\n\n" + sep.join(lines)


def town_name(rng: random.Random) -> str:
    return rng.choice(TOWN_PARTS_A) + rng.choice(TOWN_PARTS_B)


def gen_town(rng: random.Random) -> str:
    t = town_name(rng)
    y0 = rng.randint(1100, 1700)
    y1 = y0 + rng.randint(40, 200)
    y2 = y1 + rng.randint(30, 150)
    kind = rng.choice(["village", "town", "small town", "market town"])
    p1 = (
        f"The {kind} of {t} lies {rng.choice(TOWN_GEO)}.  It is first mentioned in records from {y0}, "
        f"when it was little more than {rng.choice(TOWN_ORIGIN)}."
    )
    p2 = rng.choice(
        [
            f"In the years after {y1}, {t} grew quickly thanks to {rng.choice(TOWN_GROWTH)}.",
            f"Around {y1} the fortunes of {t} changed with {rng.choice(TOWN_GROWTH)}.",
            f"By {y1}, {rng.choice(TOWN_GROWTH)} had made {t} busier and richer than its neighbors.",
        ]
    )
    p3 = rng.choice(
        [
            f"Not everything went well.  In {y2} {rng.choice(TOWN_EVENTS)}.",
            f"The town's records note that in {y2} {rng.choice(TOWN_EVENTS)}.",
            f"Older residents still tell the story of {y2}, the year {rng.choice(TOWN_EVENTS)}.",
        ]
    )
    p4 = f"Today {t} is {rng.choice(TOWN_TODAY)}."
    head = rng.choice([f"A brief history of {t}", f"{t}", f"The story of {t}", f"{t}: a local history"])
    return f"{head}\n\n{p1} {p2}\n\n{p3} {p4}"


def gen_story(rng: random.Random) -> str:
    name = rng.choice(FIRST_NAMES)
    subj, obj, poss, refl = PRONOUNS[NAME_GENDER[name]]
    goal, setback, success = rng.choice(STORY_GOALS)
    helper = rng.choice(STORY_HELPERS)
    time = rng.choice(STORY_TIMES)
    months = rng.choice(["a few weeks", "two months", "most of a year", "three long seasons", "a whole summer"])
    if "took the breath out of" in setback:
        setback = setback + " " + obj
    open_ = rng.choice(
        [
            f"{name} had always wanted to {goal}.",
            f"For as long as anyone could remember, {name} had talked about wanting to {goal}.",
            f"One {time}, {name} decided that this would be the year to {goal}.",
        ]
    )
    mid = rng.choice(
        [
            f"It did not go well at first: {setback}.",
            f"The beginning was hard.  {cap(setback)}.",
            f"Things went wrong almost at once, because {setback}.",
        ]
    )
    help_ = rng.choice(
        [
            f"Then {helper} offered to help, and the two of them worked at it together for {months}.",
            f"{cap(subj)} nearly gave up, but {helper} told {obj} to keep trying, a little every day, and {subj} did, for {months}.",
            f"After that, {subj} asked {helper} for advice, wrote it down in a notebook, and practised for {months}.",
        ]
    )
    end = rng.choice(
        [
            f"At last, on a {rng.choice(STORY_TIMES)}, {name} {success}.",
            f"And then one {rng.choice(STORY_TIMES)}, almost without noticing, {name} {success}.",
            f"In the end, {name} {success}, and {helper} was there to see it.",
        ]
    )
    moral = rng.choice(
        [
            "",
            "",
            f"\n\n{cap(subj)} kept the notebook for years afterwards.",
            f'\n\nWhen people asked {obj} how {subj} had done it, {subj} only said, "Slowly."',
            f"\n\nIt was, {subj} said later, the best thing {subj} had ever done.",
        ]
    )
    return f"{open_} {mid}\n\n{help_} {end}{moral}"


def gen_letter(rng: random.Random) -> str:
    to, frm = rng.sample(FIRST_NAMES, 2)
    subject, first = rng.choice(LETTER_REASONS)
    body2 = rng.choice(
        [
            "Everyone here is well.  The cat has taken to sleeping in the laundry basket, which nobody minds except the laundry.",
            "Work has been busy, but I have started walking to the office, and it does make the mornings better.",
            f"The weather has been {rng.choice(WEATHER)[0]} for most of the week, so we have mostly stayed in and read.",
            f"I finally {rng.choice(ACTIVITIES)}, which I have been meaning to do since spring.",
        ]
    )
    close = rng.choice(["With love", "Best wishes", "Warmly", "Write soon", "See you soon", "All the best"])
    return f"Dear {to},\n\n{first}  {body2}\n\nI hope you are keeping well.  Let me know your news.\n\n{close},\n{frm}"


def num_text(rng: random.Random, n: int) -> str:
    if n <= 20 and rng.random() < 0.5:
        return NUMBER_WORDS[n]
    return str(n)


def gen_arithmetic(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        lines = []
        for _ in range(rng.randint(6, 12)):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            op = rng.choice("+-x")
            if op == "+":
                lines.append(f"{a} + {b} = {a + b}")
            elif op == "-":
                a, b = max(a, b), min(a, b)
                lines.append(f"{a} - {b} = {a - b}")
            else:
                a, b = rng.randint(1, 10), rng.randint(1, 10)
                lines.append(f"{a} x {b} = {a * b}")
        return f"Practice sheet {rng.randint(1, 60)}\n\n" + "\n".join(lines)
    if kind == 1:
        out = []
        for _ in range(rng.randint(3, 5)):
            name = rng.choice(FIRST_NAMES)
            subj = PRONOUNS[NAME_GENDER[name]][0]
            other = rng.choice([n for n in FIRST_NAMES if n != name])
            item = rng.choice(ITEMS)
            a = rng.randint(3, 20)
            b = rng.randint(1, a - 1)
            if rng.random() < 0.5:
                out.append(
                    f"{name} has {num_text(rng, a)} {item}.  {cap(subj)} gives {num_text(rng, b)} to {other}.  "
                    f"Now {subj} has {num_text(rng, a - b)} {item} left."
                )
            else:
                c = rng.randint(1, 10)
                out.append(
                    f"{name} has {num_text(rng, a)} {item}, and {other} brings {num_text(rng, c)} more.  "
                    f"Together they have {num_text(rng, a + c)} {item}."
                )
        return "Word problems\n\n" + "\n\n".join(out)
    n = rng.randint(2, 9)
    rows = [f"{i} x {n} = {i * n}" for i in range(1, 11)]
    return f"The {NUMBER_WORDS[n]} times table\n\n" + "\n".join(rows)


def gen_guide(rng: random.Random) -> str:
    topic = rng.choice(HOW_GUIDES_TOPICS)
    tips = GUIDE_TIPS[topic][:]
    rng.shuffle(tips)
    tips = tips[: rng.randint(3, 5)]
    title = rng.choice(
        [f"Tips: how to {topic}", f"How to {topic}", f"A few ways to {topic}", f"Advice for anyone trying to {topic}"]
    )
    if rng.random() < 0.5:
        return title + "\n\n" + "\n".join(f"- {t}" for t in tips)
    return (
        title
        + "\n\n"
        + rng.choice(
            [
                "Here is some simple advice.",
                "These ideas have helped many people.",
                "None of this is difficult, but it takes practice.",
            ]
        )
        + "  "
        + " ".join(tips)
    )


def gen_science_note(rng: random.Random, essays: list[str]) -> str:
    picks = rng.sample(essays, 2)
    week = rng.randint(1, 30)
    return f"Science notes, week {week}\n\n" + "\n\n".join(p.split("\n\n", 1)[1] for p in picks)


def tidy(text: str) -> str:
    """Use one space between sentences everywhere."""
    return re.sub(r"(?<=[.!?:\"]) {2,}(?=\S)", " ", text)


def make_prose(rng: random.Random) -> list[dict]:
    docs: list[tuple[str, str]] = []
    for e in ESSAYS:
        docs.append(("essay", e))
    for f in FABLES:
        docs.append(("fable", f))
    for h in HOWTOS:
        docs.append(("howto", h))
    for a in ANIMALS:
        for _ in range(3):
            docs.append(("animal", gen_animal(rng, a)))
    for _ in range(24):
        docs.append(("space", gen_solar_system(rng)))
    for d in DISHES:
        for _ in range(3):
            docs.append(("recipe", gen_recipe(rng, d)))
    for _ in range(60):
        docs.append(("diary", gen_diary(rng)))
    for _ in range(45):
        docs.append(("history", gen_town(rng)))
    for _ in range(55):
        docs.append(("story", gen_story(rng)))
    for _ in range(30):
        docs.append(("letter", gen_letter(rng)))
    for _ in range(40):
        docs.append(("arithmetic", gen_arithmetic(rng)))
    for _ in range(24):
        docs.append(("advice", gen_guide(rng)))
    for _ in range(14):
        docs.append(("science", gen_science_note(rng, ESSAYS)))
    rng.shuffle(docs)
    return [{"text": tidy(t), "kind": k} for k, t in docs]


# ---------------------------------------------------------------------------
# conversations
# ---------------------------------------------------------------------------

TONES = {
    "friendly": dict(
        hi=["Hi!", "Hey there!", "Hello!", "Hi, how are you?"],
        ok=["Sounds good.", "That works for me.", "Nice, I like that.", "Sure thing."],
        thanks=["Thanks so much!", "Thank you, that helps.", "Cheers, I appreciate it."],
        bye=["See you soon!", "Talk later!", "Have a good one!", "Take care!"],
    ),
    "formal": dict(
        hi=["Good morning.", "Good afternoon.", "Hello, may I ask you something?"],
        ok=["That would be acceptable.", "Very well.", "That seems reasonable."],
        thanks=["Thank you for your help.", "I am grateful for your time.", "Thank you very much."],
        bye=["Have a pleasant day.", "Goodbye, and thank you again.", "I will be in touch."],
    ),
    "excited": dict(
        hi=["Oh, hi! Guess what?", "Hey! You will not believe this!", "Hi hi hi!"],
        ok=["Yes! Let's do it!", "That sounds amazing!", "Oh, I love that idea!"],
        thanks=["Thank you, thank you!", "You are the best!", "Wow, thanks!"],
        bye=["Can't wait!", "This is going to be great!", "See you there!"],
    ),
    "worried": dict(
        hi=["Hi... do you have a minute?", "Hey, sorry to bother you.", "Hello, can I ask you something?"],
        ok=["I suppose that could work.", "Okay, if you think so.", "That might be all right."],
        thanks=[
            "Thank you, that makes me feel a bit better.",
            "Thanks, I was really worried.",
            "That helps, thank you.",
        ],
        bye=["I hope it works out.", "Fingers crossed.", "I'll let you know how it goes."],
    ),
    "curious": dict(
        hi=["Hi, can I ask you a question?", "Hello! I was wondering something.", "Hey, quick question."],
        ok=["Interesting, that makes sense.", "Oh, I see.", "Huh, I never thought of that."],
        thanks=["Thanks for explaining.", "Thank you, I learned something.", "That is really useful, thanks."],
        bye=["I'll look into it more.", "I'll read up on it tonight.", "Thanks again, bye!"],
    ),
    "tired": dict(
        hi=["Hey.", "Hi. Long day.", "Oh, hello."],
        ok=["Fine by me.", "Okay.", "Sure, whatever is easiest."],
        thanks=["Thanks.", "Thanks, really.", "Appreciate it."],
        bye=["I need to sleep.", "Night.", "Bye for now."],
    ),
    "playful": dict(
        hi=["Well, well, look who it is!", "Ahoy!", "Greetings, fellow human!"],
        ok=["Deal, and no backing out.", "Only if I get the window seat.", "Fine, but you owe me a biscuit."],
        thanks=["You're a star.", "My hero!", "Thanks, I owe you one."],
        bye=["Off I go!", "Catch you later, alligator.", "Farewell, brave friend."],
    ),
}


def conv_weekend(rng, tone):
    act1, act2 = rng.sample(
        [
            "go hiking",
            "visit the market",
            "see a film",
            "bake something",
            "clean the flat",
            "go to the beach",
            "visit my parents",
            "finally read that novel",
            "try the new cafe",
            "paint the bathroom",
        ],
        2,
    )
    day = rng.choice(["Saturday", "Sunday"])
    return [
        f"{rng.choice(TONES[tone]['hi'])} Any plans for the weekend?",
        f"I think I'll {act1} on {day}. What about you?",
        f"I was going to {act2}, but I could join you if you like.",
        rng.choice(TONES[tone]["ok"]) + f" Let's meet at {rng.randint(8, 11)} in the morning.",
        rng.choice(TONES[tone]["bye"]),
    ]


def conv_recipe(rng, tone):
    d = rng.choice(DISHES)
    step = rng.choice(d["steps"])
    return [
        f"{rng.choice(TONES[tone]['hi'])} Do you know how to make {d['name']}?",
        f"Yes, it's easy. You need {', '.join(d['ingredients'][:3])} and a few other things.",
        "What's the trickiest part?",
        f"Probably this: {step[0].lower() + step[1:]}",
        rng.choice(TONES[tone]["thanks"]) + " I'll try it tonight.",
        f"{d['note']} {rng.choice(TONES[tone]['bye'])}",
    ]


def conv_weather(rng, tone):
    w, sent = rng.choice(WEATHER)
    w2 = rng.choice([x for x, _ in WEATHER if x != w])
    return [
        f"{rng.choice(TONES[tone]['hi'])} What's the weather like where you are?",
        f"It's {w} here. {sent}",
        f"Here it's {w2}. The forecast says it will change tomorrow, though.",
        rng.choice(["I hope it clears up for you.", "Typical, isn't it?", "At least it's not boring."]),
        rng.choice(TONES[tone]["bye"]),
    ]


def conv_animal(rng, tone):
    a = rng.choice(ANIMALS)
    return [
        f"{rng.choice(TONES[tone]['hi'])} What does a {a['name']} eat?",
        f"Mostly {a['food']}.",
        "And where does it live?",
        f"In {a['home']}. It's also known for {a['trait']}.",
        rng.choice(TONES[tone]["ok"]) + " " + rng.choice(TONES[tone]["thanks"]),
    ]


def conv_planet(rng, tone):
    p = rng.choice(PLANETS)
    return [
        f"{rng.choice(TONES[tone]['hi'])} Which planet is {p[3]}?",
        f"That's {p[0]}.",
        "Really? Tell me something else about it.",
        f"Well, {p[4]}.",
        rng.choice(TONES[tone]["thanks"]),
    ]


def conv_math(rng, tone):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    item = rng.choice(ITEMS)
    return [
        f"{rng.choice(TONES[tone]['hi'])} Can you help me with my homework?",
        "Sure, what is it?",
        f"If there are {a} bags with {b} {item} in each, how many {item} are there?",
        f"Multiply them: {a} times {b} is {a * b}. So there are {a * b} {item}.",
        rng.choice(TONES[tone]["thanks"]),
    ]


def conv_lost(rng, tone):
    thing = rng.choice(["keys", "phone", "wallet", "glasses", "umbrella", "library card", "headphones"])
    place = rng.choice(
        [
            "in your coat pocket",
            "on the kitchen table",
            "by the front door",
            "in the car",
            "under the sofa cushions",
            "in yesterday's bag",
        ]
    )
    found = rng.random() < 0.7
    turns = [
        f"{rng.choice(TONES[tone]['hi'])} I can't find my {thing} anywhere.",
        "When did you last have them?" if thing.endswith("s") else "When did you last have it?",
        rng.choice(["This morning, I think.", "Last night, when I came home.", "I really don't remember."]),
        f"Have you looked {place}?",
    ]
    if found:
        turns += [
            "Oh! There they are." if thing.endswith("s") else "Oh! There it is.",
            rng.choice(TONES[tone]["thanks"]),
        ]
    else:
        turns += [
            "Not there either.",
            "Let's retrace your steps after lunch. It will turn up.",
            rng.choice(TONES[tone]["thanks"]),
        ]
    return turns


def conv_book(rng, tone):
    genre = rng.choice(
        [
            "mystery",
            "adventure story",
            "history book",
            "science fiction novel",
            "book of poems",
            "cookbook",
            "biography",
            "travel book",
        ]
    )
    name = rng.choice(FIRST_NAMES)
    return [
        f"{rng.choice(TONES[tone]['hi'])} Can you recommend something to read?",
        "What kind of thing do you like?",
        f"Maybe a {genre}. Something I can finish in a week.",
        f"My friend {name} lent me a great {genre} last month. I'll bring it tomorrow.",
        rng.choice(TONES[tone]["thanks"]),
        rng.choice(TONES[tone]["bye"]),
    ]


def conv_garden(rng, tone):
    plant = rng.choice(["tomatoes", "basil", "roses", "beans", "strawberries", "sunflowers", "lettuce"])
    problem = rng.choice(
        [
            "the leaves are turning yellow",
            "something is eating the leaves",
            "they are growing tall and thin",
            "they are wilting in the afternoon",
        ]
    )
    fix = {
        "the leaves are turning yellow": "It might be too much water. Let the soil dry out a little between waterings.",
        "something is eating the leaves": "Check under the leaves at night with a torch. Slugs are the usual suspects.",
        "they are growing tall and thin": "They probably need more light. Try moving them somewhere sunnier.",
        "they are wilting in the afternoon": "Water them in the early morning, and give them a good soak rather than a sprinkle.",
    }[problem]
    return [
        f"{rng.choice(TONES[tone]['hi'])} My {plant} aren't doing well.",
        "What's wrong with them?",
        f"Well, {problem}.",
        fix,
        rng.choice(TONES[tone]["thanks"]),
    ]


def conv_travel(rng, tone):
    place = rng.choice(["the coast", "the mountains", "the city", "my aunt's farm", "the lakes", "the old town"])
    mode = rng.choice(["train", "bus", "car", "bike"])
    hours = rng.randint(1, 6)
    return [
        f"{rng.choice(TONES[tone]['hi'])} I'm going to {place} next week.",
        "How are you getting there?",
        f"By {mode}. It takes about {NUMBER_WORDS[hours]} hour{'s' if hours > 1 else ''}.",
        rng.choice(
            [
                "Don't forget a raincoat.",
                "Bring a good book for the journey.",
                "Send me a postcard!",
                "Make sure you book ahead, it gets busy.",
            ]
        ),
        rng.choice(TONES[tone]["ok"]),
        rng.choice(TONES[tone]["bye"]),
    ]


def conv_exam(rng, tone):
    subj = rng.choice(["history", "chemistry", "French", "maths", "biology", "geography", "music theory"])
    tip = rng.choice(GUIDE_TIPS["study for an exam"])
    return [
        f"{rng.choice(TONES[tone]['hi'])} I have a {subj} exam on {rng.choice(DAYS)}.",
        "How is the studying going?",
        rng.choice(["Slowly.", "Not great, honestly.", "Better than I expected.", "I keep getting distracted."]),
        f"Here's what helped me: {tip[0].lower() + tip[1:]}",
        rng.choice(TONES[tone]["thanks"]),
        "Good luck! You'll be fine.",
    ]


def conv_repair(rng, tone):
    thing, fix = rng.choice(
        [
            (
                "bike chain keeps slipping",
                "The chain might be worn or the gears need adjusting. A bike shop can check it quickly.",
            ),
            (
                "kitchen tap is dripping",
                "It's usually a worn washer. Turn off the water under the sink before you take it apart.",
            ),
            ("door squeaks", "A drop of oil on the hinges should fix it."),
            ("laptop is really slow", "Try closing the programs you aren't using and restarting it."),
            (
                "window won't close properly",
                "The frame may have swollen in the damp. It often fixes itself when the weather dries.",
            ),
        ]
    )
    return [
        f"{rng.choice(TONES[tone]['hi'])} My {thing}.",
        fix,
        rng.choice(["I'll try that.", "Is it expensive to fix?", "I hadn't thought of that."]),
        rng.choice(["Give it a go and see.", "It shouldn't be, but ask first.", "Let me know if it works."]),
        rng.choice(TONES[tone]["thanks"]),
    ]


def conv_music(rng, tone):
    inst = rng.choice(["guitar", "piano", "violin", "drums", "flute", "ukulele"])
    weeks = rng.randint(2, 12)
    return [
        f"{rng.choice(TONES[tone]['hi'])} I've started learning the {inst}.",
        "That's great. How long have you been playing?",
        f"About {NUMBER_WORDS[weeks] if weeks <= 20 else weeks} weeks. My fingers hurt.",
        "That gets better. Practise a little every day rather than a lot once a week.",
        rng.choice(TONES[tone]["ok"]),
        rng.choice(TONES[tone]["bye"]),
    ]


def conv_science(rng, tone):
    q, a = rng.choice(
        [
            (
                "Why is the sky blue?",
                "Air scatters blue light more than red light, so blue comes at us from every direction.",
            ),
            ("What causes the tides?", "Mostly the Moon's gravity pulling on the oceans, with some help from the Sun."),
            (
                "Why do we have seasons?",
                "Because the Earth's axis is tilted, so each half leans toward the Sun for part of the year.",
            ),
            (
                "How do plants eat?",
                "They make sugar from air and water, using energy from sunlight. It's called photosynthesis.",
            ),
            ("Why does bread rise?", "Yeast makes carbon dioxide, and the gas gets trapped in the stretchy dough."),
            (
                "How does a compass work?",
                "The needle is a little magnet, and it lines up with the Earth's magnetic field.",
            ),
            (
                "Why is there no sound in space?",
                "Sound needs air or something else to travel through, and space is nearly empty.",
            ),
            (
                "Where does rain come from?",
                "Water evaporates, rises, cools into clouds, and falls when the droplets get heavy.",
            ),
        ]
    )
    return [
        f"{rng.choice(TONES[tone]['hi'])} {q}",
        a,
        rng.choice(TONES[tone]["ok"])
        + " "
        + rng.choice(["Is that always true?", "Who figured that out?", "Can you explain a bit more?"]),
        rng.choice(
            [
                "Pretty much, though the details get complicated.",
                "People worked it out over a long time.",
                "There's a good chapter on it in the library book I have.",
            ]
        ),
        rng.choice(TONES[tone]["thanks"]),
    ]


def conv_pet(rng, tone):
    pet = rng.choice(["cat", "dog", "rabbit", "hamster", "parrot", "tortoise"])
    name = rng.choice(["Biscuit", "Pepper", "Mango", "Shadow", "Pickle", "Juniper", "Waffles", "Socks"])
    return [
        f"{rng.choice(TONES[tone]['hi'])} Did I tell you we got a {pet}?",
        "No! What's its name?",
        f"{name}. It's already taken over the sofa.",
        rng.choice(["Of course it has.", "Send me a photo!", "I want to meet it."]),
        rng.choice(TONES[tone]["ok"]) + " Come round on " + rng.choice(DAYS) + ".",
        rng.choice(TONES[tone]["bye"]),
    ]


CONV_TOPICS = [
    ("weekend plans", conv_weekend),
    ("cooking", conv_recipe),
    ("weather", conv_weather),
    ("animals", conv_animal),
    ("space", conv_planet),
    ("homework", conv_math),
    ("lost item", conv_lost),
    ("books", conv_book),
    ("gardening", conv_garden),
    ("travel", conv_travel),
    ("exams", conv_exam),
    ("repairs", conv_repair),
    ("music", conv_music),
    ("science", conv_science),
    ("pets", conv_pet),
]


def make_conversations(rng: random.Random, n: int) -> list[dict]:
    out = []
    tones = list(TONES)
    for i in range(n):
        topic, fn = CONV_TOPICS[i % len(CONV_TOPICS)]
        tone = rng.choice(tones)
        turns = fn(rng, tone)
        first_is_p2 = rng.random() < 0.25
        layout = rng.choice(["blank", "blank", "line", "inline"])
        parts = []
        for j, t in enumerate(turns):
            speaker = 1 + ((j + (1 if first_is_p2 else 0)) % 2)
            parts.append(f"<person{speaker}> {t}")
        sep = {"blank": "\n\n", "line": "\n", "inline": " "}[layout]
        out.append({"conversation": sep.join(parts), "topic": topic, "tone": tone})
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(SEED)
    prose = make_prose(rng)
    convs = make_conversations(rng, 360)
    with open(os.path.join(HERE, "prose.jsonl"), "w", encoding="utf-8") as f:
        for d in prose:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(os.path.join(HERE, "conversations.jsonl"), "w", encoding="utf-8") as f:
        for d in convs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    sizes = {n: os.path.getsize(os.path.join(HERE, n)) for n in ("prose.jsonl", "conversations.jsonl")}
    print(f"{len(prose)} prose documents, {len(convs)} conversations, sizes {sizes}")


if __name__ == "__main__":
    main()
